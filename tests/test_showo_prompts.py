"""Show-o's prompts, attention masks and MaskGIT schedule (`prompt_format="showo"`), against the
golden fixture rows Show-o's own code built (``shared/fixtures/showo/showo``, see
test_convert_showo.py) and numpy reference loops of ``Showo.t2i_generate``."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unif2ace_jax.models.masks import showo_mmu_attention_mask, showo_t2i_attention_mask
from unif2ace_jax.models.sequences import (TASK_MMU, TASK_T2I, showo_mmu_rows, showo_prompt,
                                          showo_t2i_rows)
from unif2ace_jax.models.vocab import Vocab
from unif2ace_jax.sampling.maskgit import annealing_factors, maskgit_sample, showo_remask_counts

import showo_fixtures

FIXTURE = showo_fixtures.path("showo")
VOCAB = Vocab(text_size=50295, num_image_codes=8192, layout="showo")
N = 16
MAX_TEXT_LEN = 13  # the fixture's max_seq_length 12, + 1


@pytest.fixture(scope="module")
def golden():
    return showo_fixtures.golden("showo")


def _text_ids(row) -> list[int]:
    """The caption ids of a golden T2I row: between ``<|t2i|> <bos>`` and ``<eos> <|soi|>``."""
    row = [int(t) for t in row]
    start = row.index(VOCAB.t2i_id) + 2
    return row[start:row.index(VOCAB.soi_id) - 1]


def _codes(ids) -> np.ndarray:
    return np.asarray(ids, np.int64) - VOCAB.image_offset


def test_t2i_rows_and_mask_match_showo(golden):
    ids, n_cond = golden["t2i_ids"], int(golden["num_t2i_cond"])
    texts = [_text_ids(r) for r in ids[:n_cond]]
    codes = _codes(ids[:, -(N + 1):-1])
    cond = showo_t2i_rows(texts, VOCAB, max_text_len=MAX_TEXT_LEN, image_codes=codes[:n_cond])
    uncond = showo_t2i_rows([[]] * n_cond, VOCAB, max_text_len=MAX_TEXT_LEN,
                            image_codes=codes[n_cond:])
    rows = np.concatenate([cond, uncond])
    np.testing.assert_array_equal(rows, ids)
    mask = showo_t2i_attention_mask(rows, pad_id=VOCAB.pad_id, soi_id=VOCAB.soi_id,
                                    eoi_id=VOCAB.eoi_id)
    np.testing.assert_array_equal(np.asarray(mask), golden["t2i_attend"])
    prompt = showo_prompt(rows, VOCAB, task=TASK_T2I, num_image_tokens=N)
    np.testing.assert_array_equal(np.asarray(prompt["attend"]), golden["t2i_attend"])
    np.testing.assert_array_equal(np.asarray(prompt["image_positions"])[0],
                                  MAX_TEXT_LEN + 1 + np.arange(N))
    np.testing.assert_array_equal(np.asarray(prompt["positions"])[0], np.arange(rows.shape[1]))


def test_t2i_rows_bos_and_truncation_rules():
    bos, eos, pad, t2i = VOCAB.bos_id, VOCAB.eos_id, VOCAB.pad_id, VOCAB.t2i_id
    rows = showo_t2i_rows([[7, 8], [bos, 7, 8], list(range(1, 20)), list(range(1, 11))], VOCAB,
                          max_text_len=MAX_TEXT_LEN, num_image_tokens=2)
    text = rows[:, :MAX_TEXT_LEN].tolist()
    assert text[0] == [pad] * 8 + [t2i, bos, 7, 8, eos]
    assert text[1] == text[0]  # a leading bos is not doubled
    assert text[2] == [t2i, bos] + list(range(1, 11)) + [eos]  # cut to max_text_len - 1, eos
    assert text[3] == [t2i, bos] + list(range(1, 11)) + [eos]  # exactly max_text_len: as is
    assert rows[0, MAX_TEXT_LEN:].tolist() == [VOCAB.soi_id, VOCAB.mask_id, VOCAB.mask_id,
                                               VOCAB.eoi_id]


def test_mmu_rows_and_mask_match_showo(golden):
    ids = golden["mmu_ids"]
    codes = _codes(ids[:, 2:2 + N])
    questions = [[int(t) for t in r[N + 4:]] for r in ids]
    rows = showo_mmu_rows(codes, questions, VOCAB)
    np.testing.assert_array_equal(rows, ids)
    mask = showo_mmu_attention_mask(rows, eoi_id=VOCAB.eoi_id)
    np.testing.assert_array_equal(np.asarray(mask), golden["mmu_attend"])
    prompt = showo_prompt(rows, VOCAB, task=TASK_MMU, num_image_tokens=N)
    np.testing.assert_array_equal(np.asarray(prompt["attend"]), golden["mmu_attend"])
    np.testing.assert_array_equal(np.asarray(prompt["image_positions"])[1], 2 + np.arange(N))


# ---------------------------------------------------------------------------------------------
# MaskGIT with Show-o's schedule


def _showo_reference(n: int, steps: int, t0: float):
    """numpy transcription of ``t2i_generate``'s bookkeeping from a fully masked canvas: the
    per-step remask count (after the clamp) and the temperature each step uses."""
    counts, temps, unknown, temperature = [], [], n, t0
    for k in range(steps):
        ratio = 1.0 * (k + 1) / steps
        mask_ratio = np.cos(np.float32(ratio) * np.float32(math.pi) * np.float32(0.5))
        mask_len = int(np.floor(np.float32(n) * mask_ratio))
        mask_len = max(1, min(unknown - 1, mask_len))
        temperature = temperature * (1.0 - ratio)
        counts.append(mask_len)
        temps.append(temperature)
        unknown = mask_len
    return counts, temps


@pytest.mark.parametrize("n,steps", [(16, 16), (256, 16), (1024, 50), (16, 5), (9, 3)])
def test_showo_counts_and_compounding_temperature(n, steps):
    counts, temps = _showo_reference(n, steps, 1.0)
    raw = showo_remask_counts(n, steps)
    clamped, unknown = [], n
    for k in range(steps):
        clamped.append(max(1, min(unknown - 1, int(raw[k]))))
        unknown = clamped[-1]
    assert clamped == counts
    np.testing.assert_allclose(annealing_factors(steps, "showo_compound"), temps, rtol=1e-12)
    assert annealing_factors(steps, "showo_compound")[-1] == 0.0
    np.testing.assert_allclose(annealing_factors(steps, "linear"),
                               1.0 - np.arange(steps) / steps)


def _random_logits_fn(k: int):
    table = jax.random.normal(jax.random.key(3), (4, 16, k)) * 3.0

    def fn(codes):
        return table[:codes.shape[0], :codes.shape[1]] + 0.0 * codes[..., None]

    return fn


def test_showo_maskgit_follows_the_schedule_and_keeps_known_codes():
    n, steps, k = 16, 6, 32
    init = np.full((4, n), k, np.int32)
    known = np.zeros((4, n), bool)
    known[1, ::3] = True
    init[known] = np.arange(known.sum()) % k
    init[2] = k  # rows 0, 2, 3 fully masked
    sample = jax.jit(lambda rng, c: maskgit_sample(
        rng, _random_logits_fn(k), c, mask_id=k, num_steps=steps, noise_temperature=4.5,
        temperature_annealing="showo_compound", remask_rule="showo", return_trace=True))
    codes, trace = sample(jax.random.key(0), jnp.asarray(init))
    codes, trace = np.asarray(codes), np.asarray(trace)
    assert (codes != k).all() and ((codes >= 0) & (codes < k)).all()
    np.testing.assert_array_equal(codes[known], init[known])
    counts, _ = _showo_reference(n, steps, 1.0)
    np.testing.assert_array_equal(trace[:, 0], counts[:-1] + [0])
    # Inpainting: counts from all N places (Show-o), clamped by the places still unknown.
    unknown, expect = int((~known[1]).sum()), []
    for raw in showo_remask_counts(n, steps)[:-1]:
        unknown = max(1, min(unknown - 1, int(raw)))
        expect.append(unknown)
    np.testing.assert_array_equal(trace[:, 1], expect + [0])


def test_default_maskgit_is_unchanged_by_the_new_options():
    k, steps = 32, 5
    init = jnp.full((4, 16), k, jnp.int32)
    fn = _random_logits_fn(k)
    base = maskgit_sample(jax.random.key(1), fn, init, mask_id=k, num_steps=steps)
    same = maskgit_sample(jax.random.key(1), fn, init, mask_id=k, num_steps=steps,
                          temperature_annealing="linear", remask_rule="unif2ace")
    np.testing.assert_array_equal(np.asarray(base), np.asarray(same))
