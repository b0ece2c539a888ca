"""Sequence builder on hand-written cases (docs/DESIGN.md §2 formats), every token list written out."""

import functools

import jax
import numpy as np
import pytest

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.sequences import (build_mmu_prefix, build_sequences, build_t2i_prompt,
                                           sequence_length)
from unif2ace_jax.models.vocab import TEXT_EOS_MARKER, Vocab

V = Vocab(text_size=10, num_image_codes=4)
T2I, MMU, SOI, EOI, BOS, EOS, PAD = 10, 11, 12, 13, 14, 15, 16
MASK = 21


def img(c):
    return 17 + c


def _batch():
    # Lt = 3, La = 2, N = 2 -> L = 3 + 2 + 2 + 5 = 12
    return dict(
        task=np.array([0, 1, 2]),
        text=np.array([[1, 2, 0], [5, 6, 7], [3, 4, 0]]),
        text_len=np.array([2, 3, 2]),
        answer=np.array([[0, 0], [8, 9], [0, 0]]),
        answer_len=np.array([0, 1, 0]),
        image_codes=np.array([[0, 4], [1, 2], [0, 0]]),  # 4 = masked
    )


EXPECTED_TOKENS = [
    [PAD, PAD, PAD, T2I, BOS, 1, 2, EOS, SOI, img(0), MASK, EOI],
    [MMU, SOI, img(1), img(2), EOI, BOS, 5, 6, 7, 8, EOS, PAD],
    [BOS, 3, 4, EOS, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD],
]


def test_training_batch_layout():
    assert sequence_length(3, 2, 2) == 12
    out = {k: np.asarray(x) for k, x in build_sequences(_batch(), V).items()}
    np.testing.assert_array_equal(out["tokens"], EXPECTED_TOKENS)
    np.testing.assert_array_equal(out["is_pad"], np.array(EXPECTED_TOKENS) == PAD)
    np.testing.assert_array_equal(out["valid"], ~out["is_pad"])
    is_image = np.zeros((3, 12), bool)
    is_image[0, [9, 10]] = True
    is_image[1, [2, 3]] = True
    np.testing.assert_array_equal(out["is_image"], is_image)
    span = np.zeros((3, 12), bool)
    span[0, 8:12] = True
    span[1, 1:5] = True
    np.testing.assert_array_equal(out["image_span"], span)
    np.testing.assert_array_equal(out["image_positions"][:2], [[9, 10], [2, 3]])
    np.testing.assert_array_equal(
        np.take_along_axis(out["tokens"], out["image_positions"], 1)[:2],
        [[img(0), MASK], [img(1), img(2)]])
    np.testing.assert_array_equal(out["positions"], [
        [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0],
        [0, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0],
    ])
    np.testing.assert_array_equal(out["group"], [[1] * 12, [0] * 12, [0] * 12])


def test_targets_and_weights():
    out = {k: np.asarray(x) for k, x in build_sequences(_batch(), V).items()}
    np.testing.assert_array_equal(out["targets"], [
        [PAD, PAD, T2I, BOS, 1, 2, EOS, SOI, img(0), MASK, EOI, PAD],
        [SOI, img(1), img(2), EOI, BOS, 5, 6, 7, 8, EOS, PAD, PAD],
        [3, 4, EOS, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD, PAD],
    ])
    np.testing.assert_array_equal(out["target_weights"], [
        [0] * 12,                                   # T2I: no text loss
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],       # MMU: predict answer 8 and <eos>
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],       # LM: predict 3, 4, <eos>
    ])
    assert out["target_weights"].dtype == np.float32


def test_text_targets_captioning_and_packed_qa_rows():
    # Row 1 captioning: prompt [5], caption [6, 7], no answer -> targets 6, 7, <eos>.
    batch = dict(_batch(), answer=np.array([[0, 0], [0, 0], [0, 0]]),
                 answer_len=np.array([0, 0, 0]),
                 text_targets=np.array([[1, 1, 0], [0, 1, 1], [1, 1, 1]], bool))
    out = {k: np.asarray(x) for k, x in build_sequences(batch, V).items()}
    np.testing.assert_array_equal(
        out["tokens"][1], [MMU, SOI, img(1), img(2), EOI, BOS, 5, 6, 7, EOS, PAD, PAD])
    np.testing.assert_array_equal(out["target_weights"], [
        [0] * 12,                                   # T2I ignores text_targets
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],       # predict 6, 7, <eos>
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],       # LM unchanged
    ])
    # Row 1 packs two QA pairs: "5 6 E" (question 5, answer 6, E -> <eos>) then question 7,
    # answer 8 -> targets 6, <eos>, 8, <eos>.
    packed = dict(_batch(), text=np.array([[1, 2, 0, 0], [5, 6, TEXT_EOS_MARKER, 7], [3, 4, 0, 0]]),
                  text_len=np.array([2, 4, 2]),
                  text_targets=np.array([[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]], bool))
    out = {k: np.asarray(x) for k, x in build_sequences(packed, V).items()}  # L = 13
    np.testing.assert_array_equal(
        out["tokens"][1], [MMU, SOI, img(1), img(2), EOI, BOS, 5, 6, EOS, 7, 8, EOS, PAD])
    np.testing.assert_array_equal(out["target_weights"][1],
                                  [0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0])
    # All-False targets are a plain VQA row: the same weights as without the field.
    vqa = dict(_batch(), text_targets=np.zeros((3, 3), bool))
    np.testing.assert_array_equal(np.asarray(build_sequences(vqa, V)["target_weights"]),
                                  np.asarray(build_sequences(_batch(), V)["target_weights"]))


def test_modality_groups_and_absolute_positions():
    out = build_sequences(_batch(), V, group_assignment="modality", position_mode="absolute")
    np.testing.assert_array_equal(np.asarray(out["group"]),
                                  np.asarray(out["is_image"]).astype(np.int32))
    np.testing.assert_array_equal(np.asarray(out["positions"]), np.tile(np.arange(12), (3, 1)))
    with pytest.raises(UserError, match="group_assignment"):
        build_sequences(_batch(), V, group_assignment="bogus")
    with pytest.raises(UserError, match="position_mode"):
        build_sequences(_batch(), V, position_mode="bogus")


def test_caption_dropout():
    out = build_sequences(_batch(), V, rng=jax.random.key(0), cond_dropout=1.0)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), [
        [PAD, PAD, PAD, PAD, PAD, T2I, BOS, EOS, SOI, img(0), MASK, EOI],
        EXPECTED_TOKENS[1], EXPECTED_TOKENS[2]])
    np.testing.assert_array_equal(np.asarray(out["caption_dropped"]), [True, False, False])
    with pytest.raises(UserError, match="rng"):
        build_sequences(_batch(), V, cond_dropout=0.5)
    # Statistical: p = 0.3 over many T2I rows; only T2I rows are ever dropped.
    n = 2000
    big = dict(task=np.arange(n) % 3, text=np.ones((n, 3), int), text_len=np.full(n, 3),
               answer=np.ones((n, 2), int), answer_len=np.ones(n, int),
               image_codes=np.zeros((n, 2), int))
    dropped = np.asarray(build_sequences(big, V, rng=jax.random.key(1),
                                         cond_dropout=0.3)["caption_dropped"])
    assert not dropped[big["task"] != 0].any()
    assert abs(dropped[big["task"] == 0].mean() - 0.3) < 0.05


def test_inside_an_outer_jit():
    eager = build_sequences(_batch(), V, rng=jax.random.key(3), cond_dropout=0.5)
    fn = jax.jit(functools.partial(build_sequences, vocab=V, cond_dropout=0.5))
    jitted = fn(_batch(), rng=jax.random.key(3))
    for k in eager:
        np.testing.assert_array_equal(np.asarray(eager[k]), np.asarray(jitted[k]), err_msg=k)


def test_no_answer_key_and_bad_shapes():
    b = _batch()
    del b["answer"], b["answer_len"]
    out = build_sequences(b, V)  # La = 0 -> L = 10
    np.testing.assert_array_equal(np.asarray(out["tokens"])[1],
                                  [MMU, SOI, img(1), img(2), EOI, BOS, 5, 6, 7, EOS])
    b = _batch()
    b["text"] = b["text"][:2]
    with pytest.raises(UserError, match="text"):
        build_sequences(b, V)


def test_t2i_prompt():
    out = build_t2i_prompt(np.array([[1, 2, 0], [3, 0, 0]]), np.array([2, 1]), V,
                           num_image_tokens=2, drop_caption=np.array([False, True]))
    np.testing.assert_array_equal(np.asarray(out["tokens"]), [
        [PAD, T2I, BOS, 1, 2, EOS, SOI, MASK, MASK, EOI],
        [PAD, PAD, PAD, T2I, BOS, EOS, SOI, MASK, MASK, EOI],
    ])
    np.testing.assert_array_equal(np.asarray(out["image_positions"]), [[7, 8], [7, 8]])
    np.testing.assert_array_equal(np.asarray(out["group"]), np.ones((2, 10)))
    # With the training text width and given codes it reproduces the training T2I row.
    train = build_sequences(_batch(), V)
    prompt = build_t2i_prompt(np.array([[1, 2, 0]]), np.array([2]), V,
                              image_codes=np.array([[0, 4]]), text_width=3 + 2 + 3)
    for k in ("tokens", "valid", "positions", "image_span", "is_image", "image_positions",
              "group"):
        np.testing.assert_array_equal(np.asarray(prompt[k])[0], np.asarray(train[k])[0], err_msg=k)


def test_mmu_prefix_left_and_right():
    codes = np.array([[1, 2], [3, 0]])
    q = np.array([[5, 6, 7], [8, 0, 0]])
    ql = np.array([3, 1])
    left = build_mmu_prefix(codes, q, ql, V, pad_side="left")
    np.testing.assert_array_equal(np.asarray(left["tokens"]), [
        [MMU, SOI, img(1), img(2), EOI, BOS, 5, 6, 7],
        [PAD, PAD, MMU, SOI, img(3), img(0), EOI, BOS, 8],
    ])
    np.testing.assert_array_equal(np.asarray(left["positions"]), [
        [0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(np.asarray(left["image_positions"]), [[2, 3], [4, 5]])
    np.testing.assert_array_equal(np.asarray(left["image_span"])[1],
                                  [0, 0, 0, 1, 1, 1, 1, 0, 0])
    right = build_mmu_prefix(codes, q, ql, V, pad_side="right")
    np.testing.assert_array_equal(np.asarray(right["tokens"]), [
        [MMU, SOI, img(1), img(2), EOI, BOS, 5, 6, 7],
        [MMU, SOI, img(3), img(0), EOI, BOS, 8, PAD, PAD],
    ])
    np.testing.assert_array_equal(np.asarray(right["image_positions"]), [[2, 3], [2, 3]])
    # The prefix is the start of the training MMU row.
    train = np.asarray(build_sequences(_batch(), V)["tokens"])[1]
    np.testing.assert_array_equal(
        np.asarray(build_mmu_prefix(np.array([[1, 2]]), np.array([[5, 6, 7]]), np.array([3]),
                                    V)["tokens"])[0], train[:9])
    with pytest.raises(UserError, match="pad_side"):
        build_mmu_prefix(codes, q, ql, V, pad_side="middle")
