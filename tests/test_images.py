"""Image-only batches: shapes, determinism, host sharding, labels, checkpointable position."""

import hashlib

import ml_collections
import numpy as np
import pytest

from unif2ace_jax.data import images as images_lib
from unif2ace_jax.data import synthface
from unif2ace_jax.errors import UserError

NUM = 12
SIZE = 32


def _config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict({"source": "synthface", "num_examples": NUM,
                                        "image_size": SIZE, "synthface_seed": 5, "cache": False})
    config.update(overrides)
    return config


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def _all(iterator) -> tuple[np.ndarray, np.ndarray]:
    batches = list(iterator)
    return (np.concatenate([b["image"] for b in batches]),
            np.concatenate([b["labels"] for b in batches]))


@pytest.fixture(scope="module")
def reference():
    """The generator's own examples, in order."""
    return list(synthface.generate(5, NUM, image_size=SIZE, split="train"))


def test_attribute_helpers_follow_the_schema():
    assert images_lib.attribute_names() == tuple(synthface.ATTRIBUTES)
    assert images_lib.num_attributes() == len(synthface.ATTRIBUTES)
    assert images_lib.num_values() == tuple(len(v) for v in synthface.ATTRIBUTES.values())


def test_attribute_labels_partial_unknown_and_inverse():
    names = list(synthface.ATTRIBUTES)
    attrs = {names[0]: synthface.ATTRIBUTES[names[0]][2], names[3]: b"not-a-value",
             names[5]: synthface.ATTRIBUTES[names[5]][1].encode()}
    labels = images_lib.attribute_labels(attrs)
    expected = np.full(len(names), -1)
    expected[0], expected[5] = 2, 1
    np.testing.assert_array_equal(labels, expected)
    assert labels.dtype == np.int32
    assert images_lib.labels_to_attributes(labels) == {
        names[0]: synthface.ATTRIBUTES[names[0]][2], names[5]: synthface.ATTRIBUTES[names[5]][1]}


def test_batches_match_the_generator_in_order(reference):
    images, labels = _all(images_lib.image_batches(_config(), "train", 5, shuffle=False,
                                                   repeat=False, drop_remainder=False))
    assert images.shape == (NUM, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert labels.shape == (NUM, len(synthface.ATTRIBUTES)) and labels.dtype == np.int32
    for i, ex in enumerate(reference):
        np.testing.assert_array_equal(images[i], ex["image"])
        for a, (name, values) in enumerate(synthface.ATTRIBUTES.items()):
            assert values[labels[i, a]] == ex["attributes"][name]


def test_batch_shapes_and_drop_remainder():
    it = images_lib.image_batches(_config(), "test", 5, repeat=False)
    batches = list(it)
    assert [b["image"].shape for b in batches] == [(5, SIZE, SIZE, 3)] * 2
    assert all(b["labels"].shape == (5, len(synthface.ATTRIBUTES)) for b in batches)


def test_shuffle_is_seeded_and_each_epoch_is_a_permutation(reference):
    def first(seed, n=3):
        it = images_lib.image_batches(_config(), "train", 4, seed=seed)
        return [next(it) for _ in range(n)]

    a, b, c = first(1), first(1), first(2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["labels"], y["labels"])
    assert any(not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))

    epochs = first(1, n=6)  # 24 faces = two epochs of 12
    digests = [[_digest(im) for b in epochs[k:k + 3] for im in b["image"]] for k in (0, 3)]
    ref = sorted(_digest(ex["image"]) for ex in reference)
    assert sorted(digests[0]) == ref and sorted(digests[1]) == ref
    assert digests[0] != digests[1]  # reshuffled every epoch


def test_host_shards_are_disjoint_and_cover_the_split(reference):
    seen = []
    for p in range(3):
        images, _ = _all(images_lib.image_batches(_config(), "train", 2, shuffle=True, seed=7,
                                                  repeat=False, process_index=p, process_count=3))
        assert images.shape[0] == NUM // 3
        seen.append({_digest(im) for im in images})
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert set.union(*seen) == {_digest(ex["image"]) for ex in reference}


def test_iterator_state_restores_the_next_batches():
    it = images_lib.image_batches(_config(), "train", 4, seed=3)
    for _ in range(4):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    fresh = images_lib.image_batches(_config(), "train", 4, seed=3)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["labels"], want["labels"])


def test_cache_gives_the_same_batches():
    plain = _all(images_lib.image_batches(_config(), "test", 4, seed=2, repeat=False))
    cached = _all(images_lib.image_batches(_config(cache=True), "test", 4, seed=2, repeat=False))
    np.testing.assert_array_equal(plain[0], cached[0])
    np.testing.assert_array_equal(plain[1], cached[1])


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="image source"):
        images_lib.image_batches(_config(source="nope"), "train", 2)
    with pytest.raises(UserError, match="split"):
        images_lib.image_batches(_config(), "validation", 2)
    with pytest.raises(UserError, match="fewer than one batch"):
        images_lib.image_batches(_config(), "train", NUM + 1)
    with pytest.raises(UserError):
        images_lib.image_batches(_config(source="tfds", name="synthface", data_dir="/nonexistent"),
                                 "train", 2)


def test_tfds_source_reads_the_built_dataset(tmp_path):
    from unif2ace_jax.data.build import build_dataset

    build_dataset("synthface", str(tmp_path), num_train=6, num_test=2, num_heldout=2, seed=4)
    config = _config(source="tfds", name="synthface", data_dir=str(tmp_path), image_size=64)
    images, labels = _all(images_lib.image_batches(config, "train", 4, shuffle=False,
                                                   repeat=False, drop_remainder=False))
    ref = list(synthface.generate(4, 6, image_size=64, split="train"))
    assert images.shape == (6, 64, 64, 3)
    for i, ex in enumerate(ref):
        np.testing.assert_array_equal(images[i], ex["image"])  # PNG is lossless
        np.testing.assert_array_equal(labels[i], [synthface.ATTRIBUTES[n].index(ex["attributes"][n])
                                                  for n in synthface.ATTRIBUTES])
    resized, _ = _all(images_lib.image_batches(_config(source="tfds", name="synthface",
                                                       data_dir=str(tmp_path), image_size=32),
                                               "test", 2, repeat=False))
    assert resized.shape == (2, 32, 32, 3)


def test_heldout_mix_adds_unseen_combinations_from_another_seed():
    config = _config(heldout_mix=0.25, heldout_seed=9)
    images, labels = _all(images_lib.image_batches(config, "train", 4, shuffle=False,
                                                   repeat=False))
    plain = list(synthface.generate(5, 9, image_size=SIZE, split="train"))
    held = list(synthface.generate(9, 3, image_size=SIZE, split="test_heldout_combos"))
    for i, ex in enumerate(plain + held):
        np.testing.assert_array_equal(images[i], ex["image"])
        np.testing.assert_array_equal(labels[i], images_lib.attribute_labels(ex["attributes"]))
    assert all(synthface.is_heldout(images_lib.labels_to_attributes(row)) for row in labels[9:])
    test_only = _all(images_lib.image_batches(config, "test", 4, shuffle=False, repeat=False))
    reference = list(synthface.generate(5, NUM, image_size=SIZE, split="test"))
    np.testing.assert_array_equal(test_only[0], np.stack([ex["image"] for ex in reference]))
    with pytest.raises(UserError, match="heldout_seed"):
        images_lib.image_batches(_config(heldout_mix=0.1, heldout_seed=5), "train", 2)
