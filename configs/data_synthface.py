"""Data-only config: SynthFace through the input pipeline (the unified-model configs copy it).

    get_config()        small_64 SynthFace (20000 / 1000 / 1000 at 64 px), the main job's data
    get_config("tiny")  tiny_64 (320 / 64 / 64), small lengths and batch, for tests and smoke runs

Fields of `data` (all used by `unif2ace_jax.data.pipeline`):
  dataset, config_name   the TFDS dataset and builder config, read from `data_dir`
  data_dir               where `python -m unif2ace_jax.data build` wrote it
  train_split, eval_split
  image_size             S of the emitted `image` [B, S, S, 3] (records of another size resized)
  max_text_len           text (caption / question / LM text) ids per example, right-padded
  max_answer_len         answer ids per mmu example
  mixture                weights of the t2i / mmu / lm tasks (normalised)
  lm_caption_prob        an lm example's text is its caption with this probability, else a QA
  mmu_caption_prob       an mmu example is captioning (caption_prompt -> the caption) with this
                         probability, else a QA pair
  caption_prompt         the captioning prompt
  mmu_questions_per_row  a QA mmu example packs up to this many QA pairs of its image (distinct
                         attributes, as many as fit in max_text_len); evaluation uses one
  t2i_short_caption_prob a t2i training caption keeps only its first k sentences (k uniform in
                         1..all) with this probability, so short prompts are in distribution;
                         evaluation always uses whole captions
  image_field            "image" | "image_codes" | "both"
  extra_fields           embedding fields passed through as float32 (derived datasets)
  batch_size             GLOBAL batch size; each of P hosts gets batch_size // P
  eval_batch_size
  seed                   shuffling and task draws
  num_threads, prefetch  grain read threads and prefetch depth (batches)
  num_workers            grain worker processes (0 = none)
  tokenizer              {name, model_path, vocab_size (0 = take the model's)}

Defaults: `unif2ace_jax.data.pipeline.default_config`; this file states what differs.
"""

from __future__ import annotations

import ml_collections

from unif2ace_jax.data import pipeline


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tiny = arg == "tiny"
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant {arg!r} for data_synthface; use '' or 'tiny'")
    config = ml_collections.ConfigDict()
    # num_threads 2 (the default) beats 0 or 4 on this 2-core machine (bench/input_pipeline.py).
    config.data = pipeline.full_config(dict(
        config_name="tiny_64" if tiny else "small_64",
        max_text_len=64 if tiny else 128,
        batch_size=8 if tiny else 64,
        eval_batch_size=8 if tiny else 64,
        tokenizer=dict(model_path="runs/data/synthface_text.model")))
    return config
