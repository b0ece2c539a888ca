"""derive_dataset: original fields untouched + computed fields; resumable; atomic."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from unif2ace_jax.data import records
from unif2ace_jax.data.build import build_dataset
from unif2ace_jax.data.derive import derive_dataset
from unif2ace_jax.errors import UserError

EXTRA = {
    "mean_pixel": tfds.features.Tensor(shape=(3,), dtype=np.float32),
    "image_codes": tfds.features.Tensor(shape=(4,), dtype=np.int32),
}


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("src"))
    build_dataset("synthface", d, num_train=11, num_test=3, num_heldout=2)
    return d


def _compute(batch):
    img = batch["image"].astype(np.float64)
    codes = (batch["index"][:, None] * 10 + np.arange(4)[None]).astype(np.int32)
    return {"mean_pixel": img.mean(axis=(1, 2)).astype(np.float32), "image_codes": codes}


def test_derived_records_hold_originals_and_new_fields(source_dir, tmp_path):
    src = records.load_builder(source_dir, "synthface")
    seen_batches = []

    def fn(batch):
        seen_batches.append(len(batch["index"]))
        assert batch["caption"].dtype == object and isinstance(batch["caption"][0], str)
        return _compute(batch)

    path = derive_dataset(src, str(tmp_path), "synthface_extra", EXTRA, fn, batch_size=4,
                          chunk_batches=1, progress=False)
    assert set(seen_batches) == {4}  # the last batch of each split is padded to batch_size
    out = records.load_builder(str(tmp_path), "synthface_extra")
    assert os.fspath(out.data_dir) == path
    assert out.info.config_name == src.info.config_name
    assert out.info.metadata["derived_from"] == src.info.full_name
    for split in ("train", "test", "test_heldout_combos"):
        a, b = src.as_data_source(split), out.as_data_source(split)
        assert len(a) == len(b)
        for i in range(len(a)):
            ra, rb = a[i], b[i]
            for key in ("id", "caption", "attributes"):
                assert ra[key] == rb[key]
            np.testing.assert_array_equal(ra["image"], rb["image"])
            assert records.qa_rows(ra["qa"]) == records.qa_rows(rb["qa"])
            np.testing.assert_allclose(rb["mean_pixel"], ra["image"].reshape(-1, 3).mean(0), rtol=1e-6)
            np.testing.assert_array_equal(rb["image_codes"], [10 * i + k for k in range(4)])
    assert not os.path.exists(os.path.join(str(tmp_path), ".derive_work"))
    # A second call finds the finished dataset and computes nothing.
    assert derive_dataset(src, str(tmp_path), "synthface_extra", EXTRA, None, batch_size=4) == path


def test_interrupted_run_resumes_to_identical_output(source_dir, tmp_path):
    src_dir = os.fspath(records.load_builder(source_dir, "synthface").data_dir)
    calls = {"n": 0}

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("boom")
        return _compute(batch)

    work = str(tmp_path / "work")
    with pytest.raises(RuntimeError, match="boom"):
        derive_dataset(src_dir, str(tmp_path / "resumed"), "d", EXTRA, flaky, batch_size=2,
                       chunk_batches=1, work_dir=work, progress=False)
    assert records.list_datasets(str(tmp_path / "resumed")) == []  # nothing that reads as complete
    assert sorted(os.listdir(os.path.join(work, "train"))) == ["chunk_000000.npz", "chunk_000001.npz"]

    recomputed = []

    def good(batch):
        recomputed.extend(batch["index"].tolist())
        return _compute(batch)

    derive_dataset(src_dir, str(tmp_path / "resumed"), "d", EXTRA, good, batch_size=2,
                   chunk_batches=1, work_dir=work, progress=False, keep_cache=True)
    # train records 0..3 were cached by the interrupted run and are not recomputed; the last
    # batch (record 10) is padded by repeating it.
    assert recomputed[:8] == [4, 5, 6, 7, 8, 9, 10, 10]
    derive_dataset(src_dir, str(tmp_path / "straight"), "d", EXTRA, _compute, batch_size=2,
                   chunk_batches=1, progress=False)
    a = records.load_builder(str(tmp_path / "resumed"), "d")
    b = records.load_builder(str(tmp_path / "straight"), "d")
    for split in a.info.splits:
        sa, sb = a.as_data_source(split), b.as_data_source(split)
        assert len(sa) == len(sb)
        for i in range(len(sa)):
            for key in ("id", "mean_pixel", "image_codes", "image"):
                np.testing.assert_array_equal(sa[i][key], sb[i][key])


def test_bad_outputs_and_inputs(source_dir, tmp_path):
    src = records.load_builder(source_dir, "synthface")
    with pytest.raises(ValueError, match="shape"):
        derive_dataset(src, str(tmp_path), "x", EXTRA,
                       lambda b: {"mean_pixel": np.zeros((4, 2)), "image_codes": np.zeros((4, 4))},
                       batch_size=4, progress=False)
    with pytest.raises(ValueError, match="lacks"):
        derive_dataset(src, str(tmp_path), "x", EXTRA, lambda b: {}, batch_size=4, progress=False,
                       work_dir=str(tmp_path / "w2"))
    with pytest.raises(UserError, match="already exist"):
        derive_dataset(src, str(tmp_path), "x", {"caption": EXTRA["mean_pixel"]}, _compute, batch_size=4)
    with pytest.raises(UserError, match="not a prepared TFDS dataset"):
        derive_dataset(str(tmp_path / "nothing"), str(tmp_path), "x", EXTRA, _compute, batch_size=4)
    with pytest.raises(UserError, match="different derive run"):
        derive_dataset(src, str(tmp_path), "x", EXTRA, _compute, batch_size=2, progress=False)
