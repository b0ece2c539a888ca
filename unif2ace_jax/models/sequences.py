"""Sequence builder: raw T2I / MMU / LM examples -> token sequences of one static length.

Formats (docs/DESIGN.md §2)::

    T2I  <pad>… <t2i> <bos> caption <eos> <soi> img_1 … img_N <eoi>      (text part left-padded)
    MMU  <mmu> <soi> img_1 … img_N <eoi> <bos> question answer <eos> <pad>…
    LM   <bos> text <eos> <pad>…

Layout of one training batch (every row has the same length)::

    L = Lt + La + N + 5        Lt = text width, La = answer width, N = image tokens

which is exactly the longest possible MMU row (5 special tokens). LM rows need Lt + 2 and are
right-padded. A T2I row is right-aligned: its text part ``<t2i> <bos> caption <eos>`` is
left-padded to the width ``W = L - N - 2 = Lt + La + 3``, so ``<soi>`` sits at ``W``, the image
at ``W+1 … W+N`` and ``<eoi>`` at ``L-1``. The MMU image sits at ``2 … N+1``. The per-example
``image_positions [B, N]`` gathers the N image logits from ``[B, L, V]`` for either task.

Positions (for rotary): ``position_mode="valid"`` (default, [ours]) numbers the non-pad tokens
``0, 1, …`` so the amount of padding never changes a row's result, and a right-padded decoding
prefix continues exactly as in training; ``"absolute"`` uses the array index (as Show-o / HF Phi
with default position ids).

Everything here is pure `jnp` with static shapes and can run under `jax.jit`; `Vocab` and the
string options are static.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.masks import showo_mmu_attention_mask, showo_t2i_attention_mask
from unif2ace_jax.models.vocab import TEXT_EOS_MARKER, Vocab

TASK_T2I = 0
TASK_MMU = 1
TASK_LM = 2

GROUP_UND = 0
GROUP_GEN = 1

GROUP_ASSIGNMENTS = ("task", "modality")
POSITION_MODES = ("valid", "absolute")
PROMPT_FORMATS = ("unif2ace", "showo")  # config.sampling.prompt_format


def sequence_length(text_width: int, answer_width: int, num_image_tokens: int) -> int:
    """The shared training length ``L = Lt + La + N + 5`` (the longest MMU row)."""
    return text_width + answer_width + num_image_tokens + 5


# ---------------------------------------------------------------------------------------------
# Packing helpers.

def _gather(values: jax.Array, idx: jax.Array) -> jax.Array:
    """`values[b, idx[b, l]]` with `idx` clipped into range. values: [B, M] -> [B, L]."""
    if values.shape[1] == 0:
        values = jnp.zeros((values.shape[0], 1), values.dtype)
    idx = jnp.clip(idx, 0, values.shape[1] - 1)
    return jnp.take_along_axis(values, idx, axis=1)


_Segment = tuple[str, "int | jax.Array", "int | jax.Array"]


def _pack(segments: Sequence[_Segment], batch: int, length: int, pad_id: int,
          start: "int | jax.Array" = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Writes consecutive segments into a pad-filled `[B, L]` row, starting at `start`.

    Each segment is `(name, value, size)`: `value` is a constant id or an id array `[B, M]`
    (its first `size` entries are used), `size` an int or `[B]` ints. Returns the tokens and,
    per segment name, a bool `[B, L]` mask of where it landed, plus ``"pad"`` (nothing landed).
    """
    pos = jnp.arange(length, dtype=jnp.int32)[None, :]
    tokens = jnp.full((batch, length), pad_id, jnp.int32)
    where: dict[str, jax.Array] = {}
    written = jnp.zeros((batch, length), bool)
    cur = jnp.broadcast_to(jnp.asarray(start, jnp.int32).reshape(-1, 1), (batch, 1))
    for name, value, size in segments:
        size = jnp.asarray(size, jnp.int32).reshape(-1, 1)
        inside = (pos >= cur) & (pos < cur + size)
        vals = value if isinstance(value, int) else _gather(value, pos - cur)
        tokens = jnp.where(inside, vals, tokens)
        where[name] = where[name] | inside if name in where else inside
        written = written | inside
        cur = cur + size
    where["pad"] = ~written
    return tokens, where


def _positions(valid: jax.Array, mode: str) -> jax.Array:
    if mode == "valid":
        pos = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1
        return jnp.where(valid, pos, 0)
    if mode == "absolute":
        return jnp.broadcast_to(jnp.arange(valid.shape[1], dtype=jnp.int32), valid.shape)
    raise UserError(f"unknown position_mode {mode!r}; known: {', '.join(POSITION_MODES)}")


def _group(task: jax.Array, is_image: jax.Array, assignment: str) -> jax.Array:
    if assignment == "task":
        gen = jnp.broadcast_to((task == TASK_T2I)[:, None], is_image.shape)
    elif assignment == "modality":
        gen = is_image
    else:
        raise UserError(
            f"unknown group_assignment {assignment!r}; known: {', '.join(GROUP_ASSIGNMENTS)}")
    return jnp.where(gen, GROUP_GEN, GROUP_UND).astype(jnp.int32)


def _lengths(n: jax.Array, width: int) -> jax.Array:
    return jnp.clip(jnp.asarray(n, jnp.int32), 0, width)


def _t2i_rows(caption, caption_len, image_ids, vocab: Vocab, length: int):
    b, n = image_ids.shape
    width = length - n - 2  # text part (left-padded) ends right before <soi>
    segments = [("t2i", vocab.t2i_id, 1), ("bos", vocab.bos_id, 1), ("text", caption, caption_len),
                ("eos", vocab.eos_id, 1), ("soi", vocab.soi_id, 1), ("image", image_ids, n),
                ("eoi", vocab.eoi_id, 1)]
    tokens, where = _pack(segments, b, length, vocab.pad_id, start=width - caption_len - 3)
    image_positions = jnp.broadcast_to(width + 1 + jnp.arange(n, dtype=jnp.int32), (b, n))
    return tokens, where, image_positions


def _mmu_segments(image_ids, question, question_len, vocab: Vocab) -> list[_Segment]:
    n = image_ids.shape[1]
    return [("mmu", vocab.mmu_id, 1), ("soi", vocab.soi_id, 1), ("image", image_ids, n),
            ("eoi", vocab.eoi_id, 1), ("bos", vocab.bos_id, 1), ("text", question, question_len)]


def _finish(tokens, where, task, image_positions, *, group_assignment, position_mode):
    valid = ~where["pad"]
    is_image = where["image"]
    out = {
        "tokens": tokens,
        "valid": valid,
        "is_pad": ~valid,
        "is_image": is_image,
        "image_span": where["soi"] | is_image | where["eoi"],
        "image_positions": image_positions,
        "positions": _positions(valid, position_mode),
        "group": _group(task, is_image, group_assignment),
        "task": task,
    }
    return out


def _check_batch(name: str, arr: jax.Array, ndim: int, batch: int | None) -> None:
    if arr.ndim != ndim:
        raise UserError(f"batch[{name!r}] must have {ndim} dims, got shape {tuple(arr.shape)}")
    if batch is not None and arr.shape[0] != batch:
        raise UserError(
            f"batch[{name!r}] has batch size {arr.shape[0]}, expected {batch}")


# ---------------------------------------------------------------------------------------------
# Training batches.

_BATCH_KEYS = ("task", "text", "text_len", "answer", "answer_len", "image_codes",
               "text_targets")


def build_sequences(batch: Mapping[str, Any], vocab: Vocab, *, rng: jax.Array | None = None,
                    cond_dropout: float = 0.0, group_assignment: str = "task",
                    position_mode: str = "valid") -> dict[str, jax.Array]:
    """Builds the mixed T2I / MMU / LM training sequences of one batch.

    Args:
      batch: ``task [B]`` int (0 t2i, 1 mmu, 2 lm; any other value is treated as lm),
        ``text [B, Lt]`` right-padded ids + ``text_len [B]`` (caption / question / text),
        ``answer [B, La]`` + ``answer_len [B]`` (MMU only; may be absent -> La = 0),
        optional ``text_targets [B, Lt]`` bool (MMU rows: text positions that are targets too,
        e.g. a caption after its prompt, or the answers of a row packing several QA pairs;
        absent -> no MMU text is a target); ``TEXT_EOS_MARKER`` in ``text`` becomes ``<eos>``,
        ``image_codes [B, N]`` in ``[0, K]`` where ``K = vocab.num_image_codes`` means masked.
      vocab: the id layout.
      rng: key for caption dropout (needed when ``cond_dropout > 0``).
      cond_dropout: probability that a T2I caption becomes empty (for classifier-free guidance).
      group_assignment: ``"task"`` (T2I rows -> gen, MMU/LM -> und) or ``"modality"``
        (image-code positions -> gen, all else und).
      position_mode: ``"valid"`` or ``"absolute"`` (see module docstring).

    Returns a dict, with ``L = Lt + La + N + 5``:
      ``tokens [B, L]`` int32; ``valid`` / ``is_pad [B, L]`` bool; ``is_image [B, L]`` (image
      code or mask positions); ``image_span [B, L]`` (``<soi>`` … ``<eoi>``, inclusive, the
      input of `omni_attention_mask`); ``image_positions [B, N]`` int32 (index of each image
      token; meaningless for LM rows); ``positions [B, L]`` int32; ``group [B, L]`` int32
      (0 und, 1 gen); ``targets [B, L]`` int32 (the next token) and ``target_weights [B, L]``
      float32 (1 where the next token is an MMU answer token / MMU text token marked in
      ``text_targets`` / MMU ``<eos>`` / LM text token / LM ``<eos>``, else 0);
      ``task [B]``; ``caption_dropped [B]`` bool.
    """
    missing = [k for k in ("task", "text", "text_len", "image_codes") if k not in batch]
    if "answer" in batch and "answer_len" not in batch:
        missing.append("answer_len")
    if missing:
        raise UserError(f"build_sequences: batch lacks {', '.join(missing)}")
    arrays = {k: jnp.asarray(batch[k]) for k in _BATCH_KEYS if k in batch}
    return _build_sequences(arrays, rng, vocab=vocab, cond_dropout=float(cond_dropout),
                            group_assignment=group_assignment, position_mode=position_mode)


@functools.partial(jax.jit, static_argnames=("vocab", "cond_dropout", "group_assignment",
                                             "position_mode"))
def _build_sequences(batch, rng, *, vocab, cond_dropout, group_assignment, position_mode):
    task = jnp.asarray(batch["task"], jnp.int32)
    _check_batch("task", task, 1, None)
    b = task.shape[0]
    text = jnp.asarray(batch["text"], jnp.int32)
    _check_batch("text", text, 2, b)
    text = jnp.where(text == TEXT_EOS_MARKER, vocab.eos_id, text)
    codes = jnp.asarray(batch["image_codes"], jnp.int32)
    _check_batch("image_codes", codes, 2, b)
    if "answer" in batch:
        answer = jnp.asarray(batch["answer"], jnp.int32)
        _check_batch("answer", answer, 2, b)
        answer_len = _lengths(batch["answer_len"], answer.shape[1])
    else:
        answer = jnp.zeros((b, 0), jnp.int32)
        answer_len = jnp.zeros((b,), jnp.int32)
    lt, la, n = text.shape[1], answer.shape[1], codes.shape[1]
    length = sequence_length(lt, la, n)
    text_len = _lengths(batch["text_len"], lt)

    dropped = jnp.zeros((b,), bool)
    if cond_dropout > 0.0:
        if rng is None:
            raise UserError("build_sequences: cond_dropout > 0 needs an rng")
        dropped = (task == TASK_T2I) & jax.random.bernoulli(rng, cond_dropout, (b,))
    caption_len = jnp.where(dropped, 0, text_len)

    image_ids = vocab.codes_to_ids(codes)
    t2i_tok, t2i_at, t2i_img = _t2i_rows(text, caption_len, image_ids, vocab, length)
    mmu_segments = _mmu_segments(image_ids, text, text_len, vocab) + [
        ("answer", answer, answer_len), ("eos", vocab.eos_id, 1)]
    mmu_tok, mmu_at = _pack(mmu_segments, b, length, vocab.pad_id)
    lm_tok, lm_at = _pack([("bos", vocab.bos_id, 1), ("text", text, text_len),
                           ("eos", vocab.eos_id, 1)], b, length, vocab.pad_id)
    mmu_img = jnp.broadcast_to(2 + jnp.arange(n, dtype=jnp.int32), (b, n))
    lm_img = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))  # unused by LM rows

    is_t2i = (task == TASK_T2I)[:, None]
    is_mmu = (task == TASK_MMU)[:, None]

    def select(t2i, mmu, lm):
        return jnp.where(is_t2i, t2i, jnp.where(is_mmu, mmu, lm))

    false = jnp.zeros((b, length), bool)
    tokens = select(t2i_tok, mmu_tok, lm_tok)
    where = {k: select(t2i_at.get(k, false), mmu_at.get(k, false), lm_at.get(k, false))
             for k in ("image", "soi", "eoi", "pad")}
    image_positions = select(t2i_img, mmu_img, lm_img)
    out = _finish(tokens, where, task, image_positions, group_assignment=group_assignment,
                  position_mode=position_mode)

    mmu_predicted = mmu_at["answer"] | mmu_at["eos"]
    if "text_targets" in batch:
        text_targets = jnp.asarray(batch["text_targets"], bool)
        _check_batch("text_targets", text_targets, 2, b)
        # The text segment starts at n + 4 in every MMU row (`_mmu_segments`).
        mmu_predicted = mmu_predicted | (
            mmu_at["text"] & _gather(text_targets, jnp.arange(length)[None, :] - (n + 4)))
    predicted = select(false, mmu_predicted, lm_at["text"] | lm_at["eos"])
    out["targets"] = jnp.concatenate(
        [tokens[:, 1:], jnp.full((b, 1), vocab.pad_id, jnp.int32)], axis=1)
    out["target_weights"] = jnp.concatenate(
        [predicted[:, 1:], jnp.zeros((b, 1), bool)], axis=1).astype(jnp.float32)
    out["caption_dropped"] = dropped
    return out


# ---------------------------------------------------------------------------------------------
# Inference prompts.

@functools.partial(jax.jit, static_argnames=("vocab", "num_image_tokens", "text_width",
                                             "group_assignment", "position_mode"))
def build_t2i_prompt(caption: jax.Array, caption_len: jax.Array, vocab: Vocab, *,
                     num_image_tokens: int | None = None, image_codes: jax.Array | None = None,
                     text_width: int | None = None, drop_caption: jax.Array | None = None,
                     group_assignment: str = "task",
                     position_mode: str = "valid") -> dict[str, jax.Array]:
    """T2I prompt ``<pad>… <t2i> <bos> caption <eos> <soi> img… <eoi>`` for sampling.

    Args:
      caption: ``[B, Lt]`` right-padded ids; caption_len: ``[B]``.
      num_image_tokens: N; the image is fully masked (all ``mask_id``) unless
        ``image_codes [B, N]`` (codes in ``[0, K]``) is given.
      text_width: width of the left-padded text part (default ``Lt + 3``, the minimum). Pass
        the training value ``Lt + La + 3`` to reproduce the training layout exactly (only needed
        with ``position_mode="absolute"``).
      drop_caption: optional ``[B]`` bool; True rows get an empty caption (CFG unconditional).

    Returns the same keys as `build_sequences` except targets; ``L = text_width + N + 2``.
    """
    caption = jnp.asarray(caption, jnp.int32)
    _check_batch("caption", caption, 2, None)
    b, lt = caption.shape
    if image_codes is None:
        if num_image_tokens is None:
            raise UserError("build_t2i_prompt needs num_image_tokens or image_codes")
        image_codes = jnp.full((b, num_image_tokens), vocab.num_image_codes, jnp.int32)
    image_codes = jnp.asarray(image_codes, jnp.int32)
    _check_batch("image_codes", image_codes, 2, b)
    width = lt + 3 if text_width is None else text_width
    if width < lt + 3:
        raise UserError(f"text_width {width} is below caption width + 3 = {lt + 3}")
    caption_len = _lengths(caption_len, lt)
    if drop_caption is not None:
        caption_len = jnp.where(jnp.asarray(drop_caption, bool), 0, caption_len)
    length = width + image_codes.shape[1] + 2
    tokens, where, image_positions = _t2i_rows(
        caption, caption_len, vocab.codes_to_ids(image_codes), vocab, length)
    task = jnp.full((b,), TASK_T2I, jnp.int32)
    return _finish(tokens, where, task, image_positions, group_assignment=group_assignment,
                   position_mode=position_mode)


@functools.partial(jax.jit, static_argnames=("vocab", "pad_side", "group_assignment",
                                             "position_mode"))
def build_mmu_prefix(image_codes: jax.Array, question: jax.Array, question_len: jax.Array,
                     vocab: Vocab, *, pad_side: str = "left", group_assignment: str = "task",
                     position_mode: str = "valid") -> dict[str, jax.Array]:
    """MMU decoding prefix ``<mmu> <soi> img… <eoi> <bos> question`` (the answer comes next).

    Args:
      image_codes: ``[B, N]`` codes in ``[0, K)``; question: ``[B, Lq]`` right-padded ids;
        question_len: ``[B]``.
      pad_side: ``"left"`` puts the pads first (every prefix ends at ``P - 1``); ``"right"``
        puts them last (the decoder then skips them through the mask).

    Returns the keys of `build_sequences` except targets, with ``P = N + Lq + 4``.
    """
    image_codes = jnp.asarray(image_codes, jnp.int32)
    question = jnp.asarray(question, jnp.int32)
    _check_batch("image_codes", image_codes, 2, None)
    b, n = image_codes.shape
    _check_batch("question", question, 2, b)
    lq = question.shape[1]
    length = n + lq + 4
    question_len = _lengths(question_len, lq)
    if pad_side == "left":
        start = lq - question_len
    elif pad_side == "right":
        start = 0
    else:
        raise UserError(f"unknown pad_side {pad_side!r}; known: left, right")
    tokens, where = _pack(_mmu_segments(vocab.codes_to_ids(image_codes), question, question_len,
                                        vocab), b, length, vocab.pad_id, start=start)
    offset = jnp.broadcast_to(jnp.asarray(start, jnp.int32), (b,))[:, None]
    image_positions = offset + 2 + jnp.arange(n, dtype=jnp.int32)[None, :]
    task = jnp.full((b,), TASK_MMU, jnp.int32)
    return _finish(tokens, where, task, image_positions, group_assignment=group_assignment,
                   position_mode=position_mode)


# ---------------------------------------------------------------------------------------------
# Show-o's inference prompts (`prompt_format="showo"`, converted Show-o weights).

def showo_t2i_rows(text_ids: Sequence[Sequence[int]], vocab: Vocab, *, max_text_len: int,
                   num_image_tokens: int | None = None,
                   image_codes: np.ndarray | None = None) -> np.ndarray:
    """Show-o's T2I rows (``UniversalPrompting.t2i_gen_prompt``), on the host.

    Each row is ``[PAD]… <|t2i|> <bos> text <eos> <|soi|> image <|eoi|>``: the text ids get
    ``<bos>`` prepended unless they start with it (empty -> ``[<bos>]``); ``<|t2i|> ids <eos>``
    is left-padded with ``[PAD]`` to `max_text_len` (Show-o's ``max_seq_length + 1``), or, when
    longer, cut to ``max_text_len - 1`` and ``<eos>`` appended. The unconditional (CFG) row is
    the one of the empty text.

    Args:
      text_ids: B id lists (no bos/eos; Phi's tokenizer adds none).
      num_image_tokens: N; the image is all ``[MASK]`` unless ``image_codes [B, N]`` (codes in
        ``[0, K]``, K = mask) is given.

    Returns int32 ``[B, max_text_len + N + 2]``.
    """
    if image_codes is None:
        if num_image_tokens is None:
            raise UserError("showo_t2i_rows needs num_image_tokens or image_codes")
        image_codes = np.full((len(text_ids), num_image_tokens), vocab.num_image_codes)
    image_codes = np.asarray(image_codes, np.int64)
    if image_codes.ndim != 2 or image_codes.shape[0] != len(text_ids):
        raise UserError(f"image_codes must be [{len(text_ids)}, N], got {image_codes.shape}")
    rows = []
    for ids, codes in zip(text_ids, image_codes):
        ids = [int(i) for i in ids]
        if not ids or ids[0] != vocab.bos_id:
            ids = [vocab.bos_id] + ids
        text = [vocab.t2i_id] + ids + [vocab.eos_id]
        if len(text) <= max_text_len:
            text = [vocab.pad_id] * (max_text_len - len(text)) + text
        else:
            text = text[:max_text_len - 1] + [vocab.eos_id]
        image = (codes + vocab.image_offset).tolist()
        rows.append(text + [vocab.soi_id] + image + [vocab.eoi_id])
    return np.asarray(rows, np.int32).reshape(len(rows), -1)


def showo_mmu_rows(image_codes: np.ndarray, question_ids: Sequence[Sequence[int]],
                   vocab: Vocab) -> np.ndarray:
    """Show-o's MMU prompt (``inference_mmu.py``): ``<|mmu|> <|soi|> image <|eoi|> <bos>
    question`` with no eos and no padding, on the host. `question_ids` are the ids of
    ``'USER: \\n' + question + ' ASSISTANT:'``, all of one length (Show-o runs batch 1).

    Args: image_codes ``[B, N]`` codes in ``[0, K)``. Returns int32 ``[B, N + 4 + Lq]``.
    """
    image_codes = np.asarray(image_codes, np.int64)
    lengths = {len(q) for q in question_ids}
    if image_codes.ndim != 2 or image_codes.shape[0] != len(question_ids) or len(lengths) > 1:
        raise UserError("showo_mmu_rows needs [B, N] codes and B questions of one length")
    rows = [[vocab.mmu_id, vocab.soi_id] + (codes + vocab.image_offset).tolist()
            + [vocab.eoi_id, vocab.bos_id] + [int(i) for i in q]
            for codes, q in zip(image_codes, question_ids)]
    return np.asarray(rows, np.int32).reshape(len(rows), -1)


def showo_prompt(tokens: jax.Array, vocab: Vocab, *, task: int, num_image_tokens: int,
                 group_assignment: str = "task",
                 position_mode: str = "absolute") -> dict[str, jax.Array]:
    """The model's prompt dict for Show-o rows (`showo_t2i_rows` / `showo_mmu_rows`): the keys
    of `build_t2i_prompt` plus ``attend [B, L, L]``, Show-o's mask for `task` (`TASK_T2I` or
    `TASK_MMU`), which `UnifiedModel.forward` and `mmu_decode` use instead of the omni mask.
    ``image_positions`` are the N places after ``<|soi|>``. Pure ``jnp`` (jit-able)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    b, length = tokens.shape
    idx = jnp.arange(length, dtype=jnp.int32)
    soi = tokens == vocab.soi_id
    eoi = tokens == vocab.eoi_id
    start = jnp.argmax(soi, axis=1).astype(jnp.int32)[:, None] + 1
    image_positions = start + jnp.arange(num_image_tokens, dtype=jnp.int32)[None, :]
    where = {"pad": tokens == vocab.pad_id, "soi": soi, "eoi": eoi,
             "image": (idx[None, :] >= start) & (idx[None, :] < start + num_image_tokens)}
    out = _finish(tokens, where, jnp.full((b,), task, jnp.int32), image_positions,
                  group_assignment=group_assignment, position_mode=position_mode)
    if task == TASK_T2I:
        out["attend"] = showo_t2i_attention_mask(tokens, pad_id=vocab.pad_id,
                                                 soi_id=vocab.soi_id, eoi_id=vocab.eoi_id)
    elif task == TASK_MMU:
        out["attend"] = showo_mmu_attention_mask(tokens, eoi_id=vocab.eoi_id)
    else:
        raise UserError(f"showo_prompt: task {task} is neither T2I ({TASK_T2I}) nor MMU")
    return out
