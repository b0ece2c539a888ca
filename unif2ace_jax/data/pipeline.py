"""Input pipeline: TFDS array_record data sources -> grain -> fixed-shape numpy "raw batches".

Reads prepared datasets (`records.load_builder`; no TensorFlow) and yields per-host batches.

Raw batch (the contract with the model's sequence builder). B = per-host batch size
(`data.batch_size // process_count`); all arrays numpy:

====================  ==================  ==================================================
`task`                int32 [B]           0 = t2i, 1 = mmu, 2 = lm (`TASKS`)
`text`                int32 [B, Lt]       text ids, right-padded with 0, truncated to
                                          Lt = `data.max_text_len`: the caption for t2i,
                                          the question for mmu, the LM text for lm
`text_len`            int32 [B]           number of real ids in `text` (<= Lt)
`answer`              int32 [B, La]       answer ids for mmu (right-padded with 0, truncated
                                          to La = `data.max_answer_len`); all 0 otherwise
`answer_len`          int32 [B]           real ids in `answer`; 0 unless mmu
`text_targets`        bool [B, Lt]        mmu rows: text positions that are targets too (the
                                          caption of a captioning row; the answers and their
                                          `TEXT_EOS_MARKER`s of a packed row); False elsewhere
`image`               uint8 [B, S, S, 3]  decoded RGB, S = `data.image_size` (records of
                                          another size are center-cropped and resized);
                                          emitted when `data.image_field` is "image"/"both"
`image_codes`         int32 [B, N]        image-tokenizer codes, flattened row-major h*w;
                                          emitted when `data.image_field` is
                                          "image_codes"/"both" (records must carry them)
`<extra field>`       float32 [B, ...]    each name in `data.extra_fields`, passed through
`qa_type`             int32 [B]           index into `records.QA_TYPES`; -1 unless mmu
`index`               int32 [B]           record index within the split (for evaluation)
`valid`               bool [B]            False only for the padding rows of the last eval
                                          batch; always True in training
====================  ==================  ==================================================

Text ids are those of the text tokenizer only (in [0, vocab_size)); special tokens and BOS/EOS
are added by the sequence builder. Classifier-free-guidance caption dropout is also its job.

Each element is built by `elements.ElementBuilder` (task mixture, captioning, packed QA rows:
see `data.elements`).

Training order: host p reads records `p::process_count`; epoch e visits them in the order of
`np.random.default_rng([seed, e]).permutation(n)` (`ordering.EpochShuffle`; every epoch differs),
forever, batched with drop_remainder. The iterator is a grain `DatasetIterator`;
`get_state()` / `set_state()` restore it exactly, and `iterator_save_args` /
`iterator_restore_args` checkpoint it as an Orbax item.

Decoding and tokenising run in `data.num_threads` grain threads (0: in the calling thread)
and, with `data.num_workers > 0`, in that many worker processes (for hosts with many cores;
see bench/input_pipeline.py for figures on this 2-core machine).

Every field of ``config.data`` is in `default_config` (configs/data_synthface.py describes
them); the builders here read `full_config` of what they are given.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from unif2ace_jax.data import records
from unif2ace_jax.data.elements import TASKS, ElementBuilder, element_spec
from unif2ace_jax.data.ordering import shuffled_forever
from unif2ace_jax.data.text_tokenizer import make_text_tokenizer
from unif2ace_jax.errors import UserError
from unif2ace_jax.utils.defaults import with_defaults


def default_config() -> ml_collections.ConfigDict:
    """Every field of ``config.data`` with its default (meanings: configs/data_synthface.py).

    ``config_name`` "" = the dataset's default builder config; ``eval_batch_size`` 0 = take
    ``batch_size``; ``tokenizer.vocab_size`` 0 = take the tokenizer model's. ``mixture`` is
    replaced whole by a config's (a task it leaves out gets weight 0).
    """
    return ml_collections.ConfigDict(dict(
        dataset="synthface", config_name="", data_dir="runs/data",
        train_split="train", eval_split="test", image_size=64,
        max_text_len=128, max_answer_len=8,
        mixture={"t2i": 1.0, "mmu": 1.0, "lm": 0.25},
        lm_caption_prob=0.5, mmu_caption_prob=0.0, caption_prompt="describe the face.",
        mmu_questions_per_row=1, t2i_short_caption_prob=0.0,
        image_field="image", extra_fields=(),
        batch_size=64, eval_batch_size=0, seed=0,
        num_threads=2, prefetch=4, num_workers=0,
        tokenizer=dict(name="sentencepiece", model_path="", vocab_size=0)))


def full_config(data: Any) -> ml_collections.ConfigDict:
    """``config.data``: `default_config` updated with `data` (unknown fields refused)."""
    return with_defaults(default_config(), data, "data", whole=("mixture",))


def _data_section(config: Any) -> ml_collections.ConfigDict:
    """`full_config` of the experiment config's `data` section, or of `config` itself."""
    return full_config(config.data if hasattr(config, "data") else config)


def _stack(elements: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in elements]) for k in elements[0]}


def open_split(data: Any, split: str, data_dir: str | None = None):
    """The random-access data source of `split` of the dataset named in `data`.

    Images are left PNG-encoded (decoded by the pipeline, with a clear error if corrupt).
    Returns (source, name) where name is "dataset/config:split" for messages.
    """
    data = full_config(data)
    data_dir = data_dir or data.data_dir
    config_name = data.config_name or None
    builder = records.load_builder(data_dir, data.dataset, config_name)
    splits = list(builder.info.splits.keys())
    if split not in splits:
        raise UserError(f"{data.dataset} has no split {split!r}; splits: {', '.join(splits)}")
    source = records.encoded_source(builder, split)
    name = f"{data.dataset}{'/' + config_name if config_name else ''}:{split}"
    return source, name


def load_tokenizer(data: Any):
    """The text tokenizer named in `data.tokenizer`; checks `vocab_size` when it is set (> 0)."""
    tok_cfg = full_config(data).tokenizer
    tok = make_text_tokenizer(tok_cfg.name, tok_cfg.model_path)
    expected = int(tok_cfg.vocab_size or 0)
    if expected and tok.vocab_size != expected:
        raise UserError(
            f"text tokenizer {tok_cfg.model_path} has {tok.vocab_size} ids but "
            f"data.tokenizer.vocab_size is {expected}"
        )
    return tok


def _process_index_count(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def per_host_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise UserError(
            f"data.batch_size {global_batch_size} must be a positive multiple of the "
            f"process count {process_count}"
        )
    return global_batch_size // process_count


def make_train_dataset(
    config: Any,
    *,
    tokenizer=None,
    process_index: int | None = None,
    process_count: int | None = None,
    split: str | None = None,
    data_dir: str | None = None,
):
    """The training `grain.MapDataset` of raw batches (infinite) for this host."""
    data = _data_section(config)
    process_index, process_count = _process_index_count(process_index, process_count)
    spec = element_spec(data)
    batch = per_host_batch_size(int(data.batch_size), process_count)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(data)
    source, name = open_split(data, split or data.train_split, data_dir)
    if len(source) < process_count:
        raise UserError(f"{name} has {len(source)} records, fewer than {process_count} processes")
    ds = grain.MapDataset.source(source).map_with_index(_with_index)
    ds = ds[process_index::process_count]
    if len(ds) < batch:
        raise UserError(f"{name}: {len(ds)} records per host is fewer than one batch of {batch}")
    ds = shuffled_forever(ds, spec.seed)
    ds = ds.map_with_index(ElementBuilder(spec, tokenizer, name, process_index))
    return ds.batch(batch, drop_remainder=True, batch_fn=_stack)


def make_train_iterator(
    config: Any,
    *,
    num_threads: int | None = None,
    prefetch: int | None = None,
    num_workers: int | None = None,
    **dataset_args: Any,
):
    """A checkpointable iterator of training raw batches (see module docstring).

    Args:
      config: the experiment config (its `data` section is used) or the `data` section.
      num_threads, prefetch: grain read threads and prefetch depth (in batches); default
        `data.num_threads` / `data.prefetch`.
      num_workers: > 0 runs the pipeline in that many grain worker processes
        (`mp_prefetch`; same batches, same order); default `data.num_workers` (0).
      **dataset_args: `make_train_dataset`'s: ``tokenizer`` (a `TextTokenizer`; default: the
        one named in `data.tokenizer`), ``process_index``, ``process_count`` (this host's
        slice; default `jax.process_index/count()`), ``split`` (default `data.train_split`),
        ``data_dir``.
    Returns:
      a `grain.DatasetIterator` yielding dicts of numpy arrays; `get_state()/set_state()`.
    """
    data = _data_section(config)
    ds = make_train_dataset(config, **dataset_args)
    threads = int(num_threads if num_threads is not None else data.num_threads)
    depth = int(prefetch if prefetch is not None else data.prefetch)
    workers = int(num_workers if num_workers is not None else data.num_workers)
    if threads <= 0:
        options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    else:
        options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=depth)
    iter_ds = ds.to_iter_dataset(options)
    if workers > 0:
        _ensure_flags_parsed()
        iter_ds = iter_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(depth, 1))
        )
    return iter(iter_ds)


def _ensure_flags_parsed() -> None:
    """grain's worker processes read absl flags; parse defaults when no absl app did."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_eval_iterator(
    config: Any,
    split: str,
    task: str = "mmu",
    *,
    tokenizer=None,
    process_index: int | None = None,
    process_count: int | None = None,
    batch_size: int | None = None,
    data_dir: str | None = None,
):
    """One pass over `split` in record order for evaluation, every host the same batch count.

    task "t2i": one element per record (its caption and image). task "mmu": one element per
    QA pair of every record (in record, then QA order). Elements are dealt to hosts
    round-robin; the last batches are padded with rows whose `valid` is False.
    """
    data = _data_section(config)
    if task not in ("t2i", "mmu"):
        raise UserError(f"eval task must be 't2i' or 'mmu', got {task!r}")
    process_index, process_count = _process_index_count(process_index, process_count)
    spec = dataclasses.replace(element_spec(data), t2i_short_caption_prob=0.0)  # whole captions
    global_batch = int(batch_size or data.eval_batch_size or data.batch_size)
    batch = per_host_batch_size(global_batch, process_count)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(data)
    source, name = open_split(data, split, data_dir)
    if task == "mmu":
        items = [(r, j) for r in range(len(source)) for j in range(_num_qa(source[r]))]
    else:
        items = [(r, None) for r in range(len(source))]
    if not items:
        raise UserError(f"{name} has nothing to evaluate for task {task}")
    per_host = math.ceil(len(items) / process_count)
    num_batches = math.ceil(per_host / batch)
    mine = items[process_index::process_count]
    mine += [(-1, None)] * (num_batches * batch - len(mine))  # grain drops None elements
    builder = ElementBuilder(spec, tokenizer, name, process_index)
    task_id = TASKS.index(task)
    template = builder.build(0, source[0], task_id, builder.rng(0), 0 if task == "mmu" else None)

    def make(item):
        if item[0] < 0:
            pad = {k: np.zeros_like(v) for k, v in template.items()}
            pad["valid"] = np.bool_(False)
            pad["qa_type"] = np.int32(-1)
            pad["index"] = np.int32(-1)
            return pad
        r, j = item
        return builder.build(r, source[r], task_id, builder.rng(r), j)

    ds = grain.MapDataset.source(mine).map(make).batch(batch, drop_remainder=True, batch_fn=_stack)
    threads = int(data.num_threads)
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * max(threads, 1))
    return iter(ds.to_iter_dataset(options))


def _with_index(index: int, record: dict) -> tuple[int, dict]:
    return index, record


def _num_qa(record: dict) -> int:
    qa = record.get(records.QA)
    if not qa:
        return 0
    return len(next(iter(qa.values()))) if qa else 0


def iterator_save_args(iterator):
    """Orbax args to save a grain iterator's state as one checkpoint item.

    Example::

        mngr = ocp.CheckpointManager(dir, item_names=("state", "data"))
        mngr.save(step, args=ocp.args.Composite(state=..., data=iterator_save_args(it)))
    """
    return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator):
    """Orbax args that restore a saved state into `iterator` (a freshly made one) in place."""
    return grain.checkpoint.CheckpointRestore(iterator)
