"""Input pipeline: raw-batch contract, mixture, determinism, checkpointing, host sharding."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from unif2ace_jax import cli
from unif2ace_jax.data import elements, pipeline, records
from unif2ace_jax.data.ordering import CounterRng, EpochShuffle
from unif2ace_jax.data.build import build_dataset, read_texts
from unif2ace_jax.data.derive import derive_dataset
from unif2ace_jax.data.text_tokenizer import SentencePieceTokenizer, train_sentencepiece
from unif2ace_jax.errors import UserError
from unif2ace_jax.models.sequences import TASK_MMU, TASK_T2I
from unif2ace_jax.models.vocab import TEXT_EOS_MARKER

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN = 24


def _data_synthface(arg):
    return cli.load_config(os.path.join(ROOT, "configs", "data_synthface.py"), arg)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pipe"))
    build_dataset("synthface", d, num_train=NUM_TRAIN, num_test=5, num_heldout=3)
    model = train_sentencepiece(read_texts(d, "synthface"), 150, os.path.join(d, "text.model"),
                                model_type="bpe")
    src = records.load_builder(d, "synthface")
    derive_dataset(
        src, d, "synthface_codes",
        {"image_codes": tfds.features.Tensor(shape=(16,), dtype=np.int32),
         "clip": tfds.features.Tensor(shape=(5,), dtype=np.float32)},
        lambda b: {"image_codes": (b["index"][:, None] * 100 + np.arange(16)).astype(np.int32),
                   "clip": np.repeat(b["index"][:, None].astype(np.float32) / 7, 5, axis=1)},
        batch_size=8, progress=False,
    )
    return d, model, src


def _config(env, **overrides):
    d, model, _ = env
    config = _data_synthface("tiny")
    data = config.data
    data.data_dir = d
    data.config_name = ""
    data.tokenizer.model_path = model
    data.batch_size = 4
    data.max_text_len = 48
    data.max_answer_len = 3
    data.num_threads = 0
    for k, v in overrides.items():
        setattr(data, k, v)
    return config


def _take(it, n):
    return [next(it) for _ in range(n)]


def _one_task_run(env, task: str, num_batches: int, **overrides):
    """(tokenizer, train source, config, first `num_batches` training batches) of a run whose
    mixture is `task` alone."""
    _, model, src = env
    tok = SentencePieceTokenizer(model)
    config = _config(env, **overrides)
    config.data.mixture = {task: 1.0}
    source = src.as_data_source("train")
    batches = _take(pipeline.make_train_iterator(config, process_index=0, process_count=1),
                    num_batches)
    return tok, source, config, batches


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_raw_batch_contract(env):
    _, model, src = env
    tok = SentencePieceTokenizer(model)
    config = _config(env)
    it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    source = src.as_data_source("train")
    seen_tasks = set()
    for batch in _take(it, 12):
        assert batch["task"].dtype == np.int32 and batch["task"].shape == (4,)
        assert batch["text"].dtype == np.int32 and batch["text"].shape == (4, 48)
        assert batch["answer"].shape == (4, 3) and batch["image"].shape == (4, 64, 64, 3)
        assert batch["image"].dtype == np.uint8 and batch["valid"].all()
        assert "image_codes" not in batch
        for b in range(4):
            rec = source[int(batch["index"][b])]
            np.testing.assert_array_equal(batch["image"][b], rec["image"])
            task = int(batch["task"][b])
            seen_tasks.add(task)
            n, m = int(batch["text_len"][b]), int(batch["answer_len"][b])
            assert not batch["text"][b, n:].any() and not batch["answer"][b, m:].any()
            text = batch["text"][b, :n].tolist()
            caption = tok.encode(records.as_str(rec["caption"]))[:48]
            rows = records.qa_rows(rec["qa"])
            if task == TASK_T2I:
                assert text == caption and m == 0 and batch["qa_type"][b] == -1
            elif task == TASK_MMU:
                matches = [r for r in rows if tok.encode(r["question"])[:48] == text
                           and tok.encode(r["answer"])[:3] == batch["answer"][b, :m].tolist()]
                assert matches, "question/answer are not a QA pair of the record"
                assert records.QA_TYPES[batch["qa_type"][b]] in {r["type"] for r in matches}
                assert m == min(3, len(tok.encode(matches[0]["answer"])))
            else:
                lm_texts = [caption] + [tok.encode(f"{r['question']} {r['answer']}")[:48] for r in rows]
                assert text in lm_texts and m == 0 and batch["qa_type"][b] == -1
    assert seen_tasks == {0, 1, 2}


def test_captioning_mmu_rows(env):
    _, model, src = env
    tok = SentencePieceTokenizer(model)
    config = _config(env, mmu_caption_prob=0.5, caption_prompt="describe the face.")
    config.data.mixture = {"mmu": 1.0}
    source = src.as_data_source("train")
    prompt = tok.encode("describe the face.")
    kinds = []
    for batch in _take(pipeline.make_train_iterator(config, process_index=0, process_count=1), 8):
        assert (batch["task"] == TASK_MMU).all()
        for b in range(4):
            n, targets = int(batch["text_len"][b]), batch["text_targets"][b]
            text = batch["text"][b, :n].tolist()
            if targets.any():  # captioning: prompt, then the caption (the targets); no answer
                rec = source[int(batch["index"][b])]
                caption = tok.encode(records.as_str(rec["caption"]))
                assert text == (prompt + caption)[:48]
                np.testing.assert_array_equal(targets, np.arange(48) >= len(prompt))
                assert batch["answer_len"][b] == 0 and batch["qa_type"][b] == -1
                kinds.append("caption")
            else:
                assert batch["answer_len"][b] > 0
                kinds.append("qa")
    assert 8 <= kinds.count("caption") <= 24, kinds  # 32 draws at p = 0.5
    with pytest.raises(UserError, match="mmu_caption_prob"):
        elements.element_spec(_config(env, mmu_caption_prob=1.5).data)


def test_caption_sentences():
    assert elements.caption_sentences("A b. C d!  E f? g") == ["A b.", "C d!", "E f?", "g"]
    assert elements.caption_sentences("  no full stop ") == ["no full stop"]
    assert elements.caption_sentences("3.5 mm. Next.") == ["3.5 mm.", "Next."]


def test_short_t2i_captions_in_training_only(env):
    tok, source, config, batches = _one_task_run(env, "t2i", 10, t2i_short_caption_prob=0.5,
                                                 max_text_len=400)
    kept, whole = [], 0
    for batch in batches:
        for b in range(4):
            caption = records.as_str(source[int(batch["index"][b])]["caption"])
            sentences = elements.caption_sentences(caption)
            text = batch["text"][b, :int(batch["text_len"][b])].tolist()
            prefixes = [tok.encode(" ".join(sentences[:k]))[:400]
                        for k in range(1, len(sentences))]
            prefixes.append(tok.encode(caption)[:400])  # uncut: the caption as it is
            assert text in prefixes, "a t2i caption must be a whole-sentence prefix"
            k = prefixes.index(text) + 1
            whole += k == len(sentences)
            kept.append(k / len(sentences))
    assert min(kept) < 0.5 and whole >= 10, (kept, whole)  # p = 0.5: about half cut, half whole
    config.data.mixture = {"t2i": 1.0, "mmu": 1.0}
    evaluated = pipeline.make_eval_iterator(config, "train", "t2i", batch_size=4)
    for batch in _take(evaluated, 3):
        for b in range(4):
            caption = records.as_str(source[int(batch["index"][b])]["caption"])
            n = int(batch["text_len"][b])
            assert batch["text"][b, :n].tolist() == tok.encode(caption)[:400]
    with pytest.raises(UserError, match="t2i_short_caption_prob"):
        elements.element_spec(_config(env, t2i_short_caption_prob=-0.1).data)


def test_packed_qa_rows(env):
    tok, source, _, batches = _one_task_run(env, "mmu", 6, mmu_questions_per_row=3,
                                            max_text_len=40)
    counts = []
    for batch in batches:
        for b in range(4):
            rows = records.qa_rows(source[int(batch["index"][b])]["qa"])
            n = int(batch["text_len"][b])
            text, targets = batch["text"][b, :n].tolist(), batch["text_targets"][b]
            assert not targets[n:].any()
            # Split "q1 a1 E q2 a2 E ... qn" at the markers; each piece is a QA pair's
            # question (not a target) then its answer and marker (targets).
            pieces, cur = [], []
            for i, t in enumerate(text):
                cur.append((t, bool(targets[i])))
                if t == TEXT_EOS_MARKER:
                    pieces.append(cur)
                    cur = []
            pairs = []
            for piece in pieces:
                k = next(i for i, (_, is_target) in enumerate(piece) if is_target)
                assert all(is_target for _, is_target in piece[k:])
                pairs.append(([t for t, _ in piece[:k]], [t for t, _ in piece[k:-1]]))
            assert not any(is_target for _, is_target in cur)  # the last question
            answer = batch["answer"][b, :int(batch["answer_len"][b])].tolist()
            pairs.append(([t for t, _ in cur], answer))
            matched = []
            for i, (q, a) in enumerate(pairs):
                cands = [r for r in rows if tok.encode(r["question"]) == q and
                         (tok.encode(r["answer"])[:3] if i == len(pairs) - 1
                          else tok.encode(r["answer"])) == a]
                assert cands, "a packed pair is not a QA pair of the record"
                matched.append(cands[0])
            attributes = [r.get("attribute", "") for r in matched]
            assert len([a for a in attributes if a]) == len({a for a in attributes if a})
            assert 1 <= len(pairs) <= 3
            counts.append(len(pairs))
    assert max(counts) >= 2, counts
    # Evaluation rows keep one QA pair each.
    ev = pipeline.make_eval_iterator(_config(env, mmu_questions_per_row=3), "test", "mmu",
                                     process_index=0, process_count=1)
    batch = next(iter(ev))
    assert not (batch["text"] == TEXT_EOS_MARKER).any() and not batch["text_targets"].any()
    with pytest.raises(UserError, match="mmu_questions_per_row"):
        elements.element_spec(_config(env, mmu_questions_per_row=0).data)


def test_task_mixture_frequencies():
    mixture = elements.mixture_probabilities({"t2i": 1, "mmu": 2, "lm": 1})
    spec = elements.ElementSpec(8, 4, 64, "image", (), mixture, seed=5)
    builder = elements.ElementBuilder(spec, tokenizer=None, source_name="x")
    draws = np.array([builder.draw_task(builder.rng(j)) for j in range(20000)])
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.25, 0.5, 0.25], atol=0.015)  # ~4.5 sigma
    again = np.array([builder.draw_task(builder.rng(j)) for j in range(200)])
    np.testing.assert_array_equal(draws[:200], again)
    other_host = elements.ElementBuilder(spec, None, "x", process_index=1)
    assert not np.array_equal(draws[:200], [other_host.draw_task(other_host.rng(j)) for j in range(200)])


def test_counter_rng_is_uniform():
    u = np.array([CounterRng(1, 0, j).random() for j in range(20000)])
    assert 0 <= u.min() and u.max() < 1
    hist = np.histogram(u, bins=10, range=(0, 1))[0] / len(u)
    np.testing.assert_allclose(hist, 0.1, atol=0.01)
    ints = [CounterRng(1, 0, j).integers(3) for j in range(3000)]
    assert set(ints) == {0, 1, 2}


def test_single_task_mixture(env):
    config = _config(env, mixture={"mmu": 1.0})
    it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    for batch in _take(it, 5):
        assert (batch["task"] == TASK_MMU).all() and (batch["answer_len"] > 0).all()
        assert (batch["qa_type"] >= 0).all()


def test_deterministic_and_restorable(env):
    config = _config(env)
    a = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    b = pipeline.make_train_iterator(config, process_index=0, process_count=1, num_threads=2)
    first = _take(a, 4)
    assert all(_same(x, y) for x, y in zip(first, _take(b, 4)))
    state = a.get_state()
    want = _take(a, 3)
    fresh = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    fresh.set_state(state)
    assert all(_same(x, y) for x, y in zip(want, _take(fresh, 3)))
    other_seed = pipeline.make_train_iterator(_config(env, seed=1), process_index=0, process_count=1)
    assert not all(_same(x, y) for x, y in zip(first, _take(other_seed, 4)))


def test_orbax_checkpoint_round_trip(env, tmp_path):
    import orbax.checkpoint as ocp

    config = _config(env)
    it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    _take(it, 5)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("state", "data"))
    mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.arange(3.0)}),
                                          data=pipeline.iterator_save_args(it)))
    mngr.wait_until_finished()
    want = _take(it, 3)
    fresh = pipeline.make_train_iterator(config, process_index=0, process_count=1)
    restored = mngr.restore(5, args=ocp.args.Composite(
        state=ocp.args.StandardRestore({"w": np.zeros(3)}), data=pipeline.iterator_restore_args(fresh)))
    np.testing.assert_array_equal(restored["state"]["w"], np.arange(3.0))
    assert all(_same(x, y) for x, y in zip(want, _take(fresh, 3)))
    mngr.close()


def test_host_slices_are_disjoint_and_cover_each_epoch(env):
    config = _config(env, batch_size=8)  # 4 per host; 12 records per host = 3 batches per epoch
    epochs = {}
    for p in range(2):
        it = pipeline.make_train_iterator(config, process_index=p, process_count=2)
        batches = _take(it, 6)
        idx = np.concatenate([b["index"] for b in batches])
        assert batches[0]["text"].shape[0] == 4
        epochs[p] = (idx[:12], idx[12:])
        for epoch in epochs[p]:
            np.testing.assert_array_equal(np.sort(epoch), np.arange(p, NUM_TRAIN, 2))
        assert not np.array_equal(epochs[p][0], epochs[p][1])  # reshuffled each epoch
    assert not set(epochs[0][0]) & set(epochs[1][0])
    assert set(epochs[0][0]) | set(epochs[1][0]) == set(range(NUM_TRAIN))


def test_epoch_shuffle_matches_numpy_permutation():
    order = EpochShuffle(7, seed=3)
    for epoch in range(3):
        want = np.random.default_rng([3, epoch]).permutation(7)
        np.testing.assert_array_equal([order(epoch * 7 + k) for k in range(7)], want)


def test_image_codes_extra_fields_and_resize(env):
    d, _, src = env
    source = src.as_data_source("train")
    config = _config(env, dataset="synthface_codes", image_field="both", extra_fields=("clip",),
                     image_size=32)
    batch = next(pipeline.make_train_iterator(config, process_index=0, process_count=1))
    assert batch["image"].shape == (4, 32, 32, 3)
    assert batch["image_codes"].dtype == np.int32 and batch["image_codes"].shape == (4, 16)
    assert batch["clip"].dtype == np.float32 and batch["clip"].shape == (4, 5)
    for b, i in enumerate(batch["index"]):
        np.testing.assert_array_equal(batch["image_codes"][b], i * 100 + np.arange(16))
        np.testing.assert_allclose(batch["clip"][b], np.full(5, i / 7, np.float32))
        full = source[int(i)]["image"]
        from PIL import Image

        want = np.asarray(Image.fromarray(full).resize((32, 32), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(batch["image"][b], want)
    codes_only = _config(env, dataset="synthface_codes", image_field="image_codes")
    batch = next(pipeline.make_train_iterator(codes_only, process_index=0, process_count=1))
    assert "image" not in batch and batch["image_codes"].shape == (4, 16)


def test_eval_iterator_covers_every_qa_pair_once(env):
    _, model, src = env
    tok = SentencePieceTokenizer(model)
    source = src.as_data_source("test")
    pairs = [(r, row) for r in range(len(source)) for row in records.qa_rows(source[r]["qa"])]
    config = _config(env, eval_batch_size=4)
    got, counts = [], []
    for p in range(2):
        batches = list(pipeline.make_eval_iterator(config, "test", "mmu", process_index=p,
                                                   process_count=2))
        counts.append(len(batches))
        rows = []
        for batch in batches:
            assert batch["text"].shape == (2, 48)
            assert (batch["task"][batch["valid"]] == TASK_MMU).all()
            assert (batch["index"][~batch["valid"]] == -1).all()
            for b in np.flatnonzero(batch["valid"]):
                rows.append((int(batch["index"][b]), batch["text"][b, : batch["text_len"][b]].tolist(),
                             batch["answer"][b, : batch["answer_len"][b]].tolist()))
        # Host p gets pairs p, p+2, ... in record-then-QA order.
        want = [(r, tok.encode(row["question"])[:48], tok.encode(row["answer"])[:3])
                for r, row in pairs[p::2]]
        assert rows == want
        got += rows
    assert counts[0] == counts[1] == -(-len(pairs) // 4)
    assert len(got) == len(pairs)
    t2i = list(pipeline.make_eval_iterator(config, "test", "t2i", process_index=0, process_count=1))
    idx = np.concatenate([b["index"][b["valid"]] for b in t2i])
    np.testing.assert_array_equal(idx, np.arange(len(source)))


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"mixture": {"t2i": 1.0, "vqa": 1.0}}, "unknown task"),
        ({"mixture": {"t2i": 0.0}}, "positive sum"),
        ({"image_field": "pixels"}, "image_field"),
        ({"batch_size": 3}, "multiple of the process count"),
        ({"dataset": "nope"}, "no dataset 'nope'"),
        ({"image_field": "image_codes"}, "no 'image_codes' field"),
        ({"extra_fields": ("face",), "dataset": "synthface_codes"}, "no field 'face'"),
        ({"max_text_len": 0}, "max_text_len"),
    ],
)
def test_bad_config_is_a_user_error(env, overrides, match):
    with pytest.raises(UserError, match=match):
        next(pipeline.make_train_iterator(_config(env, **overrides), process_index=0, process_count=2))


def test_tokenizer_checks(env, tmp_path):
    config = _config(env)
    config.data.tokenizer.vocab_size = 999
    with pytest.raises(UserError, match="has 150 ids"):
        pipeline.make_train_iterator(config, process_index=0, process_count=1)
    config.data.tokenizer.vocab_size = 0
    config.data.tokenizer.model_path = str(tmp_path / "missing.model")
    with pytest.raises(UserError, match="not found"):
        pipeline.make_train_iterator(config, process_index=0, process_count=1)


def test_corrupt_image_names_the_record(env):
    _, model, src = env
    spec = elements.element_spec(_config(env).data)
    builder = elements.ElementBuilder(spec, SentencePieceTokenizer(model), "synthface:train")
    rec = dict(src.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})[3])
    rec["image"] = rec["image"][:30]
    with pytest.raises(UserError, match="corrupt image synthface:train record 3"):
        builder.build(3, rec, TASK_T2I, builder.rng(0))


@pytest.mark.slow  # ~20 s: starts grain worker processes
def test_worker_processes_give_the_same_batches_and_restore(env):
    config = _config(env)
    want = _take(pipeline.make_train_iterator(config, process_index=0, process_count=1), 6)
    it = pipeline.make_train_iterator(config, process_index=0, process_count=1, num_workers=2)
    got = _take(it, 3)
    state = it.get_state()
    it.close()
    assert all(_same(x, y) for x, y in zip(want[:3], got))
    fresh = pipeline.make_train_iterator(config, process_index=0, process_count=1, num_workers=2)
    fresh.set_state(state)
    assert all(_same(x, y) for x, y in zip(want[3:], _take(fresh, 3)))
    fresh.close()
