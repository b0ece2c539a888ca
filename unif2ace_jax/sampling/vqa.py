"""Model-level visual question answering: image codes + question ids -> answer text.

Wraps `sampling.mmu.mmu_decode` (KV-cache decoding of ``<mmu> <soi> img… <eoi> <bos> question``,
greedy by default) for the unified model, in fixed-size chunks so one compilation serves a whole
evaluation. The question width is cut to the longest question of the call, rounded up to a
multiple of 16 (few distinct shapes); with ``position_mode="valid"`` padding never changes an
answer.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.sequences import (TASK_MMU, build_mmu_prefix, showo_mmu_rows,
                                          showo_prompt)
from unif2ace_jax.models.unified import UnifiedModel, default_features
from unif2ace_jax.sampling.mmu import mmu_decode
from unif2ace_jax.sampling.t2i import encode_texts, sampling_options


def answer_ids(model: UnifiedModel, params: Any, image_codes: np.ndarray, question: np.ndarray,
               question_len: np.ndarray, *, max_new_tokens: int = 6, chunk: int = 64,
               temperature: float = 0.0, top_k: int = 0, seed: int = 0,
               features: Mapping[str, np.ndarray] | None = None) -> list[list[int]]:
    """Answers as text-id lists (``<eos>`` and what follows removed).

    Args:
      image_codes: ``[B, N]`` int in ``[0, K)``; question: ``[B, Lq]`` right-padded ids;
        question_len: ``[B]``.
      max_new_tokens: the most tokens generated per answer (``<eos>`` included).
      chunk: rows per decoding call (the last chunk is padded).
      features: per-image seq-MoE inputs, each ``[B, ...]`` (e.g. ``clip [B, Dc]``,
        ``face [B, Df]``, ``clip_present [B] bool``), from the records or computed on the fly
        (`data.embeddings.compute_features`); ``task`` and ``mask_ratio`` are added here.
    """
    image_codes = np.asarray(image_codes, np.int32)
    question = np.asarray(question, np.int32)
    question_len = np.asarray(question_len, np.int32)
    total = image_codes.shape[0]
    if total == 0:
        return []
    if image_codes.shape[1] != model.num_image_tokens:
        raise UserError(f"expected {model.num_image_tokens} image codes per image, got "
                        f"{image_codes.shape[1]}")
    width = max(1, int(question_len.max()))
    width = min(question.shape[1], -(-width // 16) * 16)
    question = question[:, :width]
    features = {k: np.asarray(v) for k, v in (features or {}).items()}
    for k, v in features.items():
        if v.shape[:1] != (total,):
            raise UserError(f"features[{k!r}] must have one row per image ({total}), got shape "
                            f"{v.shape}")
    chunk = max(1, min(chunk, total))
    variables = {"params": params}
    out: list[list[int]] = []
    for c, start in enumerate(range(0, total, chunk)):
        sl = slice(start, start + chunk)
        codes, q, ql = image_codes[sl], question[sl], question_len[sl]
        extra = {k: v[sl] for k, v in features.items()}
        n = codes.shape[0]
        if n < chunk:
            codes, q, ql = _pad_rows(codes, chunk), _pad_rows(q, chunk), _pad_rows(ql, chunk)
            extra = {k: _pad_rows(v, chunk) for k, v in extra.items()}
        prefix = build_mmu_prefix(codes, q, ql, model.vocab, pad_side="left",
                                  group_assignment=model.group_assignment,
                                  position_mode=model.position_mode)
        feats = default_features(jnp.full((chunk,), TASK_MMU, jnp.int32),
                                 jnp.zeros((chunk,), jnp.float32), extra)
        result = mmu_decode(model.backbone, variables, prefix, vocab=model.vocab,
                            max_new_tokens=int(max_new_tokens),
                            rng=jax.random.fold_in(jax.random.key(seed), c),
                            temperature=float(temperature), top_k=int(top_k),
                            features=feats)
        tokens = np.asarray(result["tokens"])[:n]
        lengths = np.asarray(result["length"])[:n]
        out.extend([row[:length].tolist() for row, length in zip(tokens, lengths)])
    return out


def showo_question(question: str) -> str:
    """Show-o's MMU question template (``inference_mmu.py``)."""
    return "USER: \n" + question + " ASSISTANT:"


def showo_answer_ids(model: UnifiedModel, params: Any, image_codes: np.ndarray,
                     question_ids: Sequence[Sequence[int]], *,
                     max_new_tokens: int = 100) -> list[list[int]]:
    """Show-o's ``mmu_generate`` with ``top_k=1``: per image, the unpadded prompt
    `showo_mmu_rows` (batch 1, as Show-o runs it) with Show-o's MMU mask, greedy over the whole
    vocabulary, stopping at ``<eos>`` (left out of the answer). KV-cache decoding."""
    out = []
    for codes, ids in zip(np.asarray(image_codes, np.int32), question_ids):
        rows = showo_mmu_rows(codes[None], [list(ids)], model.vocab)
        prefix = showo_prompt(rows, model.vocab, task=TASK_MMU,
                              num_image_tokens=model.num_image_tokens,
                              group_assignment=model.group_assignment,
                              position_mode=model.position_mode)
        feats = default_features(jnp.full((1,), TASK_MMU, jnp.int32), jnp.zeros((1,), jnp.float32))
        result = mmu_decode(model.backbone, {"params": params}, prefix, vocab=model.vocab,
                            max_new_tokens=int(max_new_tokens), restrict_to_text=False,
                            features=feats)
        length = int(np.asarray(result["length"])[0])
        out.append(np.asarray(result["tokens"])[0, :length].tolist())
    return out


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """`x` with zero (False) rows appended up to `rows`."""
    return np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)])


def answer_questions(trained, image_codes: np.ndarray, questions: Sequence[str], *,
                     max_new_tokens: int | None = None, chunk: int = 64,
                     features: Mapping[str, np.ndarray] | None = None) -> list[str]:
    """Answer strings for (image codes ``[B, N]``, question strings); `trained` is a
    `checkpoint.trained.Trained`; `features` as in `answer_ids` (one row per image)."""
    if len(questions) != len(image_codes):
        raise UserError(f"{len(image_codes)} images but {len(questions)} questions")
    tok = trained.text_tokenizer
    opts = sampling_options(trained.config, max_answer_tokens=max_new_tokens)
    max_new_tokens = opts.max_answer_tokens
    if opts.prompt_format == "showo":
        ids = [tok.encode(showo_question(q)) for q in questions]
        answers = showo_answer_ids(trained.model, trained.params, image_codes, ids,
                                   max_new_tokens=max_new_tokens)
        # Show-o decodes with skip_special_tokens; image and Show-o ids are no text.
        text_size = trained.model.vocab.text_size
        return [tok.decode([i for i in a if i < text_size], skip_special_tokens=True)
                for a in answers]
    ids, lens = encode_texts(tok, questions, int(trained.config.data.max_text_len))
    answers = answer_ids(trained.model, trained.params, image_codes, ids, lens,
                         max_new_tokens=max_new_tokens, chunk=chunk, features=features)
    return [tok.decode(a) for a in answers]
