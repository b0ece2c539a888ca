"""The shared token vocabulary of the unified model (docs/DESIGN.md §2).

Two layouts, chosen by ``layout`` (``config.model.vocab_layout``). ``"unif2ace"`` (default), in
id order::

    [ text ids (text_size) | special ids (7) | image codes (num_image_codes) | [MASK] | padding ]

Special ids, in order: ``<t2i> <mmu> <soi> <eoi> <bos> <eos> <pad>``. Image code ``c`` has id
``image_offset + c``; the mask token directly follows the codes, so ``image_offset + K`` is
``mask_id`` and a code array that already holds ``K`` at masked places maps to ids by one add.
``pad_to_multiple`` rounds ``size`` up (unused ids at the end) so the embedding and lm-head
dims divide evenly over a tensor-parallel mesh axis.

``"showo"`` (converted Show-o weights; Show-o's ``UniversalPrompting`` ids)::

    [ text ids (text_size) | [PAD] <|soi|> <|eoi|> <|sov|> <|eov|> <|t2i|> <|mmu|> <|t2v|>
      <|v2v|> <|lvg|> | image codes | [MASK] ]

``<bos>`` = ``<eos>`` = the text tokenizer's ``<|endoftext|>`` (``text_eot_id``, 50256 for
Phi-1.5's tokenizer), an id inside the text range. With Phi-1.5 (50295 text ids): ``[PAD]``
50295, ``<|soi|>`` 50296, ``<|t2i|>`` 50300, ``<|mmu|>`` 50301, code c = 50305 + c, and with
8192 codes ``[MASK]`` = 58497, the last id. The mask again directly follows the codes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from unif2ace_jax.errors import UserError

SPECIAL_TOKENS: tuple[str, ...] = ("t2i", "mmu", "soi", "eoi", "bos", "eos", "pad")
LAYOUTS = ("unif2ace", "showo")
# Show-o's added tokens after the text vocabulary, in id order ("pad" is `[PAD]`).
SHOWO_ADDED: tuple[str, ...] = ("pad", "soi", "eoi", "sov", "eov", "t2i", "mmu", "t2v", "v2v",
                                "lvg")
PHI_ENDOFTEXT_ID = 50256  # `<|endoftext|>` of Phi-1.5's (GPT-2) tokenizer: Show-o's bos and eos
# In a raw batch's MMU `text`, this value stands for `<eos>` (the end of an answer inside a
# row that packs several question-answer pairs); the sequence builder writes `eos_id` there.
TEXT_EOS_MARKER = -1


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Token ids of the unified model. Hashable, so it can be a static argument of `jax.jit`."""

    text_size: int
    num_image_codes: int
    pad_to_multiple: int = 1
    layout: str = "unif2ace"
    text_eot_id: int = PHI_ENDOFTEXT_ID  # bos = eos in the "showo" layout (unused otherwise)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise UserError(f"unknown vocab layout {self.layout!r}; known: {', '.join(LAYOUTS)}")
        if self.layout == "showo" and not 0 <= self.text_eot_id < self.text_size:
            raise UserError(f"vocab text_eot_id {self.text_eot_id} is not a text id "
                            f"(text_size {self.text_size})")
        if self.text_size < 1:
            raise UserError(f"vocab text_size must be >= 1, got {self.text_size}")
        if self.num_image_codes < 1:
            raise UserError(f"vocab num_image_codes must be >= 1, got {self.num_image_codes}")
        if self.pad_to_multiple < 1:
            raise UserError(f"vocab pad_to_multiple must be >= 1, got {self.pad_to_multiple}")

    # Special ids.
    def _special(self, name: str) -> int:
        if self.layout == "showo":
            if name in ("bos", "eos"):
                return self.text_eot_id
            return self.text_size + SHOWO_ADDED.index(name)
        return self.text_size + SPECIAL_TOKENS.index(name)

    @property
    def t2i_id(self) -> int:
        return self._special("t2i")

    @property
    def mmu_id(self) -> int:
        return self._special("mmu")

    @property
    def soi_id(self) -> int:
        return self._special("soi")

    @property
    def eoi_id(self) -> int:
        return self._special("eoi")

    @property
    def bos_id(self) -> int:
        return self._special("bos")

    @property
    def eos_id(self) -> int:
        return self._special("eos")

    @property
    def pad_id(self) -> int:
        return self._special("pad")

    @property
    def image_offset(self) -> int:
        """Id of image code 0."""
        added = SHOWO_ADDED if self.layout == "showo" else SPECIAL_TOKENS
        return self.text_size + len(added)

    @property
    def mask_id(self) -> int:
        """The `[MASK]` id, equal to `image_offset + num_image_codes`."""
        return self.image_offset + self.num_image_codes

    @property
    def used_size(self) -> int:
        """Number of ids that mean something (`mask_id + 1`)."""
        return self.mask_id + 1

    @property
    def size(self) -> int:
        """Embedding / lm-head rows: `used_size` rounded up to `pad_to_multiple`."""
        m = self.pad_to_multiple
        return -(-self.used_size // m) * m

    def special_ids(self) -> dict[str, int]:
        """`{"t2i": id, ..., "pad": id}` (the names of `SPECIAL_TOKENS`)."""
        return {name: self._special(name) for name in SPECIAL_TOKENS}

    # Code <-> id maps (jnp; work on any integer array shape).
    def codes_to_ids(self, codes: jax.Array) -> jax.Array:
        """Image codes in `[0, K]` (K = mask) -> token ids in `[image_offset, mask_id]`."""
        return jnp.asarray(codes, jnp.int32) + self.image_offset

    def ids_to_codes(self, ids: jax.Array) -> jax.Array:
        """Token ids in `[image_offset, mask_id]` -> codes in `[0, K]` (K = mask).

        Ids outside that range are clipped into it; check with `is_image_id` first if unsure.
        """
        return jnp.clip(jnp.asarray(ids, jnp.int32) - self.image_offset, 0, self.num_image_codes)

    def is_image_id(self, ids: jax.Array) -> jax.Array:
        """True for image-code ids and the mask id."""
        ids = jnp.asarray(ids)
        return (ids >= self.image_offset) & (ids <= self.mask_id)

    def is_text_id(self, ids: jax.Array) -> jax.Array:
        ids = jnp.asarray(ids)
        return (ids >= 0) & (ids < self.text_size)
