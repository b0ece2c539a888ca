"""Omni-attention mask on hand-written cases and against a python-loop reference."""

import jax
import numpy as np
import pytest

from unif2ace_jax.models.masks import omni_attention_mask


def _mask(is_pad, span):
    return np.asarray(omni_attention_mask(np.array([is_pad], bool), np.array([span], bool)))[0]


# Hand-written cases: (is_pad, image span, expected mask: row i attends to column j).
CASES = [
    pytest.param(  # tokens: <pad> <t2i> cap <soi> img img <eoi>
        [1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 1],
        [
            [1, 0, 0, 0, 0, 0, 0],  # pad row: itself only
            [0, 1, 0, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0, 0],
            [0, 1, 1, 1, 1, 1, 1],  # <soi> .. <eoi>: whole span + earlier text
            [0, 1, 1, 1, 1, 1, 1],
            [0, 1, 1, 1, 1, 1, 1],
            [0, 1, 1, 1, 1, 1, 1],
        ],
        id="t2i_left_padded"),
    pytest.param(  # tokens: <mmu> <soi> img <eoi> <bos> q a <pad>
        [0, 0, 0, 0, 0, 0, 0, 1],
        [0, 1, 1, 1, 0, 0, 0, 0],
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 0, 1],
        ],
        id="mmu_right_padded"),
    pytest.param(  # <soi> img <eoi> t <pad> <soi> img <eoi>
        [0, 0, 0, 0, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 1, 1],
        [
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 1, 1, 1],
            [1, 1, 1, 1, 0, 1, 1, 1],
            [1, 1, 1, 1, 0, 1, 1, 1],
        ],
        id="two_spans_and_pad_in_the_middle"),
]


@pytest.mark.parametrize("is_pad, span, expected", CASES)
def test_hand_written(is_pad, span, expected):
    np.testing.assert_array_equal(_mask(is_pad, span), np.array(expected, bool))


def _reference(is_pad, span):
    """Direct python loops over rows/columns (independent of the vectorised code)."""
    length = len(is_pad)
    span = [bool(s) and not bool(p) for s, p in zip(span, is_pad)]
    out = np.zeros((length, length), bool)
    for i in range(length):
        if is_pad[i]:
            out[i, i] = True
            continue
        last = i
        if span[i]:
            while last + 1 < length and span[last + 1]:
                last += 1
        for j in range(length):
            out[i, j] = (j <= last) and not is_pad[j]
    return out


def test_random_against_loop_reference_under_jit():
    rng = np.random.default_rng(0)
    is_pad = rng.random((16, 12)) < 0.2
    span = rng.random((16, 12)) < 0.5
    got = np.asarray(jax.jit(omni_attention_mask)(is_pad, span))
    for b in range(16):
        np.testing.assert_array_equal(got[b], _reference(is_pad[b], span[b]), err_msg=f"row {b}")
    assert got.any(axis=-1).all()  # no row is fully masked
