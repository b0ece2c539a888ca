"""Evaluation of a trained unified model on a SynthFace split (understanding, generation, NELBO).

    python -m unif2ace_jax.evaluate --workdir=DIR --split=test [--judge_workdir=JUDGE_DIR]
    python -m unif2ace_jax.evaluate --workdir=DIR --split=test_heldout_combos

Prints ONE JSON object:

* ``vqa_accuracy``: exact match (normalised answer text) of greedy answers to every question of
  the split's records (``--max_questions`` caps it), and ``vqa_accuracy_per_type`` (attribute,
  yes_no, count, which, ...).
* ``gen_attribute_accuracy``: faces generated from the split's captions (``--num_generate``
  of them), scored by the SynthFace attribute judge (`evaluate/judge.py`) on exactly the
  attributes each caption states (true values from the records' ``attributes``; mentions found
  by `evaluate/mentions.py` in the caption as the model saw it, i.e. truncated to its text
  width). The fraction of all scored (face, attribute) pairs that are right;
  ``gen_attribute_accuracy_mean`` averages per attribute, ``..._per_attribute`` lists them, and
  ``real_attribute_accuracy`` is the judge on the real faces with the same attribute sets (the
  ceiling the judge allows). Generation starts from the caption alone: a seq-MoE's image
  features (clip / face) are absent there (zeros, ``<name>_present = False``).
* ``nelbo_bits_per_token``: the caption-conditioned D3Diff NELBO per image token in bits, with
  the ELBO's own forward process (each position masked independently with probability m(τ),
  τ ~ U(0,1)), so its expectation is an upper bound on −log2 p(codes | caption) / N;
  ``--nelbo_samples`` mask draws per image.
* ``routing`` (models with a token- or sequence-level MoE only): per-layer expert usage per
  group and the sequence router's choices, and ``routing.figure``, the PNG drawn next to the
  checkpoints (`evaluate/routing.py`).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from typing import Any

import jax
import ml_collections
import numpy as np

from unif2ace_jax.checkpoint.trained import load_trained
from unif2ace_jax.data import pipeline, records
from unif2ace_jax.data.images import resize_image
from unif2ace_jax.errors import UserError
from unif2ace_jax.evaluate.batches import eval_batches
from unif2ace_jax.evaluate.judge import load_judge
from unif2ace_jax.evaluate.mentions import mentioned_attributes
from unif2ace_jax.evaluate.routing import has_moe, routing_diagnostics
from unif2ace_jax.losses.unified import model_inputs, unified_loss
from unif2ace_jax.sampling.t2i import (codes_to_images, generate_codes, generate_kwargs,
                                       sampling_options)
from unif2ace_jax.sampling.vqa import answer_ids


def _normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def _extra_fields(trained) -> tuple[str, ...]:
    """The record fields the run's seq-MoE reads (``config.data.extra_fields``)."""
    return tuple(pipeline.full_config(trained.config.data).extra_fields)


def _feature_columns(batch, keep: np.ndarray, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The kept rows of a batch's feature fields (and their ``<name>_present`` masks)."""
    names = [n for f in fields for n in (f, f"{f}_present") if n in batch]
    return {n: np.asarray(batch[n])[keep] for n in names}


# ---------------------------------------------------------------------------------------------
# VQA


def vqa_accuracy(trained, split: str, *, max_questions: int | None = None,
                 batch_size: int = 100) -> dict[str, Any]:
    """Greedy answers to the split's questions vs the reference answers (exact match)."""
    codes, questions, qlens, refs, types = [], [], [], [], []
    fields = _extra_fields(trained)
    feats: dict[str, list[np.ndarray]] = defaultdict(list)
    count = 0
    for batch in eval_batches(trained, split, "mmu", "image_codes", batch_size):
        keep = np.array(batch["valid"], bool)
        if max_questions is not None:
            keep &= np.cumsum(keep) + count <= max_questions
        count += int(keep.sum())
        codes.append(batch["image_codes"][keep])
        questions.append(batch["text"][keep])
        qlens.append(batch["text_len"][keep])
        refs += [row[:n].tolist() for row, n in zip(batch["answer"][keep],
                                                     batch["answer_len"][keep])]
        types += batch["qa_type"][keep].tolist()
        for name, value in _feature_columns(batch, keep, fields).items():
            feats[name].append(value)
        if max_questions is not None and count >= max_questions:
            break
    if not refs:
        raise UserError(f"split {split} has no questions to evaluate")
    max_tokens = sampling_options(trained.config).max_answer_tokens
    predictions = answer_ids(trained.model, trained.params, np.concatenate(codes),
                             np.concatenate(questions), np.concatenate(qlens),
                             max_new_tokens=max_tokens, chunk=batch_size,
                             features={k: np.concatenate(v) for k, v in feats.items()})
    tok = trained.text_tokenizer
    right = np.array([_normalise(tok.decode(p)) == _normalise(tok.decode(r))
                      for p, r in zip(predictions, refs)])
    per_type: dict[str, list[bool]] = defaultdict(list)
    for t, ok in zip(types, right):
        per_type[records.QA_TYPES[t] if 0 <= t < len(records.QA_TYPES) else "other"].append(ok)
    return {"vqa_accuracy": float(right.mean()),
            "vqa_accuracy_per_type": {k: float(np.mean(v)) for k, v in sorted(per_type.items())},
            "num_questions": int(right.size)}


# ---------------------------------------------------------------------------------------------
# Generation, judged


def _record_attributes(trained, split: str, indices: np.ndarray) -> list[dict]:
    source, _ = pipeline.open_split(trained.config.data, split)
    out = []
    for i in indices:
        raw = records.as_str(source[int(i)][records.ATTRIBUTES])
        out.append(json.loads(raw) if raw else {})
    return out


def generation_accuracy(trained, split: str, judge_workdir: str, *, num_generate: int,
                        batch_size: int = 32, seed: int = 0, sampler: str | None = None,
                        steps: int | None = None, guidance: float | None = None
                        ) -> dict[str, Any]:
    """The judge's accuracy on faces generated from the split's first `num_generate` captions."""
    judge = load_judge(judge_workdir)
    image_tokenizer = trained.image_tokenizer
    ids, lens, real, index = [], [], [], []
    count = 0
    for batch in eval_batches(trained, split, "t2i", "both", batch_size):
        keep = np.array(batch["valid"], bool)
        keep &= np.cumsum(keep) + count <= num_generate
        count += int(keep.sum())
        ids.append(batch["text"][keep])
        lens.append(batch["text_len"][keep])
        real.append(batch["image"][keep])
        index.append(batch["index"][keep])
        if count >= num_generate:
            break
    ids, lens = np.concatenate(ids), np.concatenate(lens)
    real, index = np.concatenate(real), np.concatenate(index)
    tok = trained.text_tokenizer
    truth = _record_attributes(trained, split, index)
    targets = [mentioned_attributes(tok.decode(row[:n].tolist()), attrs)
               for row, n, attrs in zip(ids, lens, truth)]
    opts = sampling_options(trained.config, sampler=sampler, steps=steps, guidance=guidance)
    codes = generate_codes(trained.model, trained.params, ids, lens, seed=seed,
                           chunk=batch_size, **generate_kwargs(opts))
    images = codes_to_images(image_tokenizer, codes, trained.model.image_grid)
    if images.shape[1] != real.shape[1]:
        real = np.stack([resize_image(im, images.shape[1]) for im in real])
    generated = judge.score(images, targets)
    on_real = judge.score(real, targets)
    per_attribute = {k: v for k, v in generated.items()
                     if k not in ("mean", "micro", "num_images", "num_scored")}
    return {"gen_attribute_accuracy": generated["micro"],
            "gen_attribute_accuracy_mean": generated["mean"],
            "gen_attribute_accuracy_per_attribute": per_attribute,
            "real_attribute_accuracy": on_real["micro"],
            "num_generated": int(generated["num_images"]),
            "num_scored_attributes": int(generated["num_scored"])}


# ---------------------------------------------------------------------------------------------
# NELBO


def nelbo(trained, split: str, *, max_images: int | None = None, samples: int = 1,
          batch_size: int = 100, seed: int = 0) -> dict[str, Any]:
    """Caption-conditioned NELBO per image token (bits): independent masking, the batch's mask
    ratios stratified over [0, 1) (`sampling.masking`, mode ``stratified``)."""
    loss_cfg = ml_collections.ConfigDict(trained.config.loss.to_dict())
    loss_cfg.masking = "stratified"
    loss_cfg.cond_dropout = 0.0
    model = trained.model
    fields = _extra_fields(trained)

    @jax.jit
    def bits(params, batch, rng):
        _, metrics = unified_loss(model, params, batch, rng, loss_cfg, train=False,
                                  extra_fields=fields)
        return metrics["nelbo_bits_per_token"]

    total, weight, count = 0.0, 0, 0
    for b, batch in enumerate(eval_batches(trained, split, "t2i", "image_codes", batch_size)):
        valid = np.array(batch["valid"], bool)
        if max_images is not None:
            valid &= np.cumsum(valid) + count <= max_images
        rows = int(valid.sum())
        if rows == 0:
            break
        inputs = model_inputs(dict(batch, valid=valid), fields)
        for s in range(samples):
            rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), b), s)
            total += float(bits(trained.params, inputs, rng)) * rows
            weight += rows
        count += rows
        if max_images is not None and count >= max_images:
            break
    return {"nelbo_bits_per_token": total / weight if weight else math.nan,
            "num_nelbo_images": count, "nelbo_samples": samples}


# ---------------------------------------------------------------------------------------------


def evaluate(workdir: str, split: str = "test", *, judge_workdir: str | None = None,
             max_questions: int | None = None, num_generate: int = 200,
             max_nelbo_images: int | None = None, nelbo_samples: int = 1,
             batch_size: int = 100, seed: int = 0, sampler: str | None = None,
             steps: int | None = None, guidance: float | None = None) -> dict[str, Any]:
    """All three evaluations; returns the JSON-ready dict (see module docstring)."""
    trained = load_trained(workdir)
    # A run's config (run.json) need not name a judge: its trainer has no such field.
    judge_workdir = judge_workdir or trained.config.get("judge_workdir", "") or ""
    if num_generate > 0 and not judge_workdir:
        raise UserError("gen_attribute_accuracy needs the attribute judge: pass "
                        "--judge_workdir (or --num_generate=0 to skip generation)")
    result: dict[str, Any] = {"split": split, "step": trained.step}
    timing = {}
    t0 = time.perf_counter()
    result.update(vqa_accuracy(trained, split, max_questions=max_questions,
                               batch_size=batch_size))
    timing["vqa"] = time.perf_counter() - t0
    if num_generate > 0:
        t0 = time.perf_counter()
        result.update(generation_accuracy(trained, split, judge_workdir,
                                          num_generate=num_generate,
                                          batch_size=min(batch_size, 32), seed=seed,
                                          sampler=sampler, steps=steps, guidance=guidance))
        timing["generation"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result.update(nelbo(trained, split, max_images=max_nelbo_images, samples=nelbo_samples,
                        batch_size=batch_size, seed=seed))
    timing["nelbo"] = time.perf_counter() - t0
    if has_moe(trained.model):  # per-layer expert usage (JSON) + the activation figure (PNG)
        t0 = time.perf_counter()
        result["routing"] = routing_diagnostics(trained, split, batch_size=min(batch_size, 32),
                                                seed=seed)
        timing["routing"] = time.perf_counter() - t0
    result["seconds"] = {k: round(v, 1) for k, v in timing.items()}
    return result
