"""Evaluation batches of a trained unified run: its data config, one task, one pass, one host."""

from __future__ import annotations

import ml_collections

from unif2ace_jax.data.pipeline import make_eval_iterator


def eval_data_config(trained, image_field: str) -> ml_collections.ConfigDict:
    """The run's ``config.data`` with ``image_field`` replaced (``image_codes`` | ``both``)."""
    data = ml_collections.ConfigDict(trained.config.data.to_dict())
    data.image_field = image_field
    return data


def eval_batches(trained, split: str, task: str, image_field: str, batch_size: int):
    """Raw batches (`data.pipeline` contract) of `task` rows of `split`, each record once."""
    return make_eval_iterator(eval_data_config(trained, image_field), split, task,
                              tokenizer=trained.text_tokenizer, process_index=0,
                              process_count=1, batch_size=batch_size)
