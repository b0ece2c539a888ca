"""Vocabulary layout (docs/DESIGN.md §2): [text | specials | image codes | MASK]."""

import numpy as np
import pytest

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.vocab import Vocab


def test_layout_written_out():
    v = Vocab(text_size=10, num_image_codes=4)
    assert v.special_ids() == {"t2i": 10, "mmu": 11, "soi": 12, "eoi": 13, "bos": 14,
                               "eos": 15, "pad": 16}
    assert (v.t2i_id, v.mmu_id, v.soi_id, v.eoi_id, v.bos_id, v.eos_id, v.pad_id) == (
        10, 11, 12, 13, 14, 15, 16)
    assert v.image_offset == 17
    assert v.mask_id == 21
    assert v.size == 22
    assert Vocab(10, 4, pad_to_multiple=8).size == 24
    assert Vocab(10, 4, pad_to_multiple=8).mask_id == 21


def test_code_id_maps():
    v = Vocab(10, 4)
    codes = np.array([[0, 1, 2], [3, 4, 0]])  # 4 = mask
    ids = np.asarray(v.codes_to_ids(codes))
    np.testing.assert_array_equal(ids, [[17, 18, 19], [20, 21, 17]])
    np.testing.assert_array_equal(np.asarray(v.ids_to_codes(ids)), codes)
    all_ids = np.arange(v.size)
    np.testing.assert_array_equal(np.asarray(v.is_image_id(all_ids)),
                                  (all_ids >= 17) & (all_ids <= 21))
    np.testing.assert_array_equal(np.asarray(v.is_text_id(all_ids)), all_ids < 10)


def test_hashable_and_bad_input():
    assert hash(Vocab(10, 4)) == hash(Vocab(10, 4))
    with pytest.raises(UserError, match="num_image_codes"):
        Vocab(10, 0)
    with pytest.raises(UserError, match="text_size"):
        Vocab(0, 4)


def test_showo_layout():
    """Show-o's ids: text, [PAD] + nine task/segment tokens, codes, [MASK]; bos = eos in text."""
    v = Vocab(text_size=50295, num_image_codes=8192, layout="showo")
    assert (v.pad_id, v.soi_id, v.eoi_id, v.t2i_id, v.mmu_id) == (50295, 50296, 50297, 50300,
                                                                  50301)
    assert (v.bos_id, v.eos_id) == (50256, 50256)
    assert (v.image_offset, v.mask_id, v.size) == (50305, 58497, 58498)
    assert v.special_ids()["pad"] == 50295 and v.special_ids()["eos"] == 50256
    np.testing.assert_array_equal(np.asarray(v.codes_to_ids(np.array([0, 8192]))),
                                  [50305, 58497])
    assert Vocab(10, 4) == Vocab(10, 4, layout="unif2ace")
    with pytest.raises(UserError, match="layout"):
        Vocab(10, 4, layout="gpt")
    with pytest.raises(UserError, match="text_eot_id"):
        Vocab(10, 4, layout="showo")  # Phi's <|endoftext|> (50256) is not among 10 text ids
