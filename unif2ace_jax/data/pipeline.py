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

Task mixture: the task of stream position j on host p is drawn from `data.mixture` (weights
for "t2i", "mmu", "lm"; normalised) with `ordering.CounterRng(seed, p, j)` (a pure function of
(seed, p, j), so the task never depends on which record lands at j or on thread timing);
the same generator picks the QA pair for mmu and the LM text (the caption with probability
`data.lm_caption_prob`, else "question answer" of a random QA pair). An mmu example is a
captioning example with probability `data.mmu_caption_prob` (text = `data.caption_prompt` then
the caption, truncated to Lt; the caption and `<eos>` are the targets), else QA: with
`data.mmu_questions_per_row = q > 1` a row packs up to q QA pairs of the image about distinct
attributes (as many as fit in Lt): ``q1 a1 E q2 a2 E … qn`` in `text` (E = `TEXT_EOS_MARKER`,
`<eos>` once built; every ``ai E`` a target) and ``an`` in `answer`, which is how one image
teaches several answers for the cost of one row. An example without QA drawn as mmu becomes
captioning when `data.mmu_caption_prob > 0`, else t2i; one without a caption drawn as t2i
becomes mmu. Evaluation rows (`qa_index` given) always hold one QA pair.

Training order: host p reads records `p::process_count`; epoch e visits them in the order of
`np.random.default_rng([seed, e]).permutation(n)` (`ordering.EpochShuffle`; every epoch differs),
forever, batched with drop_remainder. The iterator is a grain `DatasetIterator`;
`get_state()` / `set_state()` restore it exactly, and `iterator_save_args` /
`iterator_restore_args` checkpoint it as an Orbax item.

Decoding and tokenising run in `data.num_threads` grain threads (0: in the calling thread)
and, with `data.num_workers > 0`, in that many worker processes (for hosts with many cores;
see bench/input_pipeline.py for figures on this 2-core machine).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import numpy as np

from unif2ace_jax.data import records
from unif2ace_jax.data.ordering import CounterRng, shuffled_forever
from unif2ace_jax.errors import UserError
from unif2ace_jax.models.sequences import TASK_LM, TASK_MMU, TASK_T2I
from unif2ace_jax.models.vocab import TEXT_EOS_MARKER

TASKS = ("t2i", "mmu", "lm")  # by task id (TASK_T2I, TASK_MMU, TASK_LM)
IMAGE_FIELDS = ("image", "image_codes", "both")


@dataclasses.dataclass(frozen=True)
class ElementSpec:
    """Everything that fixes the shape and content of one raw element (from `config.data`)."""

    max_text_len: int
    max_answer_len: int
    image_size: int
    image_field: str
    extra_fields: tuple[str, ...]
    mixture: tuple[float, float, float]  # probabilities of TASKS
    seed: int
    lm_caption_prob: float = 0.5
    mmu_caption_prob: float = 0.0
    caption_prompt: str = "describe the face."
    mmu_questions_per_row: int = 1
    t2i_short_caption_prob: float = 0.0

    @property
    def wants_image(self) -> bool:
        return self.image_field in ("image", "both")

    @property
    def wants_codes(self) -> bool:
        return self.image_field in ("image_codes", "both")


def mixture_probabilities(mixture: Mapping[str, float]) -> tuple[float, float, float]:
    """Normalised (t2i, mmu, lm) probabilities; UserError for unknown tasks or bad weights."""
    mixture = dict(mixture)
    unknown = sorted(set(mixture) - set(TASKS))
    if unknown:
        raise UserError(f"unknown task(s) {unknown} in data.mixture; known: {', '.join(TASKS)}")
    w = np.array([float(mixture.get(t, 0.0)) for t in TASKS])
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise UserError(f"data.mixture weights must be >= 0 with a positive sum, got {mixture}")
    p = w / w.sum()
    return (float(p[0]), float(p[1]), float(p[2]))


def element_spec(data: Any) -> ElementSpec:
    """ElementSpec from a config's `data` section (a ConfigDict or anything with attributes)."""
    image_field = str(data.image_field)
    if image_field not in IMAGE_FIELDS:
        raise UserError(f"data.image_field must be one of {IMAGE_FIELDS}, got {image_field!r}")
    for name in ("max_text_len", "max_answer_len", "image_size"):
        if int(getattr(data, name)) <= 0:
            raise UserError(f"data.{name} must be > 0, got {getattr(data, name)}")
    mixture = data.mixture.to_dict() if hasattr(data.mixture, "to_dict") else dict(data.mixture)
    return ElementSpec(
        max_text_len=int(data.max_text_len),
        max_answer_len=int(data.max_answer_len),
        image_size=int(data.image_size),
        image_field=image_field,
        extra_fields=tuple(data.get("extra_fields", ()) or ()),
        mixture=mixture_probabilities(mixture),
        seed=int(data.seed),
        lm_caption_prob=float(data.get("lm_caption_prob", 0.5)),
        mmu_caption_prob=_probability(data, "mmu_caption_prob", 0.0),
        caption_prompt=str(data.get("caption_prompt", "describe the face.")),
        mmu_questions_per_row=_positive(data, "mmu_questions_per_row", 1),
        t2i_short_caption_prob=_probability(data, "t2i_short_caption_prob", 0.0),
    )


def _positive(data: Any, name: str, default: int) -> int:
    value = int(data.get(name, default))
    if value < 1:
        raise UserError(f"data.{name} must be >= 1, got {value}")
    return value


def _probability(data: Any, name: str, default: float) -> float:
    value = float(data.get(name, default))
    if not 0.0 <= value <= 1.0:
        raise UserError(f"data.{name} must be in [0, 1], got {value}")
    return value


def caption_sentences(caption: str) -> list[str]:
    """The caption's sentences (split after ``.``, ``!`` or ``?`` and white space); ``[caption]``
    when it has none."""
    parts = [p for p in _SENTENCE_END.split(caption.strip()) if p]
    return parts or [caption]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _stack(elements: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in elements]) for k in elements[0]}


def _pad(ids: list[int], length: int) -> tuple[np.ndarray, int]:
    ids = ids[:length]
    out = np.zeros(length, np.int32)
    out[: len(ids)] = ids
    return out, len(ids)


class ElementBuilder:
    """Turns one record (as read from the data source) into one raw element (no batch axis).

    Args:
      spec: shapes, mixture, seed.
      tokenizer: a `TextTokenizer`.
      source_name: names the dataset in error messages.
      process_index: mixes into the task draw so hosts draw independently.
    """

    def __init__(self, spec: ElementSpec, tokenizer, source_name: str, process_index: int = 0):
        self.spec = spec
        self.tokenizer = tokenizer
        self.source_name = source_name
        self.process_index = process_index

    def rng(self, position: int) -> CounterRng:
        return CounterRng(self.spec.seed, self.process_index, position)

    def draw_task(self, rng: CounterRng) -> int:
        u = rng.random()
        p_t2i, p_mmu, _ = self.spec.mixture
        if u < p_t2i:
            return TASK_T2I
        if u < p_t2i + p_mmu:
            return TASK_MMU
        return TASK_LM if self.spec.mixture[2] > 0 else TASK_MMU

    def __call__(self, position: int, item: tuple[int, dict]) -> dict[str, np.ndarray]:
        index, record = item
        rng = self.rng(position)
        return self.build(index, record, self.draw_task(rng), rng)

    def _packed_qa(self, qa: list[dict], rng: CounterRng
                   ) -> tuple[dict, list[int], list[bool]]:
        """Up to `mmu_questions_per_row` QA pairs about distinct attributes, in random order:
        ``(last row, text ids "q1 a1 E … qn", text targets)``; the last answer goes to `answer`."""
        spec = self.spec
        order = list(range(len(qa)))
        for i in range(len(order) - 1, 0, -1):  # Fisher-Yates with the element's counter rng
            j = rng.integers(i + 1)
            order[i], order[j] = order[j], order[i]
        rows, seen = [], set()
        for i in order:
            attribute = qa[i].get("attribute", "")
            if attribute and attribute in seen:
                continue
            seen.add(attribute)
            rows.append(qa[i])
            if len(rows) == spec.mmu_questions_per_row:
                break
        last = rows[0]
        last_q = self.tokenizer.encode(last["question"])
        room = spec.max_text_len - len(last_q)
        text_ids: list[int] = []
        text_targets: list[bool] = []
        for row in rows[1:]:
            q = self.tokenizer.encode(row["question"])
            a = self.tokenizer.encode(row["answer"]) + [TEXT_EOS_MARKER]
            if len(text_ids) + len(q) + len(a) > room:
                break
            text_ids += q + a
            text_targets += [False] * len(q) + [True] * len(a)
        return last, text_ids + last_q, text_targets + [False] * len(last_q)

    def build(
        self, index: int, record: dict, task: int, rng: CounterRng, qa_index: int | None = None
    ) -> dict[str, np.ndarray]:
        spec = self.spec
        caption = records.as_str(record[records.CAPTION])
        qa = records.qa_rows(record[records.QA]) if records.QA in record else []
        captioning = False
        if task == TASK_MMU and qa_index is None and caption and spec.mmu_caption_prob > 0:
            captioning = not qa or rng.random() < spec.mmu_caption_prob
        if task == TASK_MMU and not qa and not captioning:
            task = TASK_T2I
        elif task == TASK_T2I and not caption and qa:
            task = TASK_MMU
        answer_ids: list[int] = []
        qa_type = -1
        text_targets: list[bool] = []
        if captioning:
            prompt_ids = self.tokenizer.encode(spec.caption_prompt)
            caption_ids = self.tokenizer.encode(caption)
            text_ids = prompt_ids + caption_ids
            text_targets = [False] * len(prompt_ids) + [True] * len(caption_ids)
        elif task == TASK_MMU:
            if qa_index is not None or spec.mmu_questions_per_row == 1:
                row = qa[qa_index if qa_index is not None else rng.integers(len(qa))]
                text_ids = self.tokenizer.encode(row["question"])
            else:
                row, text_ids, text_targets = self._packed_qa(qa, rng)
            answer_ids = self.tokenizer.encode(row["answer"])
            qa_type = records.qa_type_index(row.get("type", "other"))
        elif task == TASK_LM:
            if not qa or rng.random() < spec.lm_caption_prob:
                text = caption
            else:
                row = qa[rng.integers(len(qa))]
                text = f"{row['question']} {row['answer']}"
        else:
            text = caption
            if spec.t2i_short_caption_prob > 0 and rng.random() < spec.t2i_short_caption_prob:
                sentences = caption_sentences(caption)
                text = " ".join(sentences[: 1 + rng.integers(len(sentences))])
        if task != TASK_MMU:
            text_ids = self.tokenizer.encode(text)
        text_arr, text_len = _pad(text_ids, spec.max_text_len)
        ans_arr, ans_len = _pad(answer_ids, spec.max_answer_len)
        targets_arr = np.zeros(spec.max_text_len, bool)
        kept = text_targets[: spec.max_text_len]
        targets_arr[: len(kept)] = kept
        out = {
            "task": np.int32(task),
            "text": text_arr,
            "text_len": np.int32(text_len),
            "answer": ans_arr,
            "answer_len": np.int32(ans_len),
            "text_targets": targets_arr,
            "qa_type": np.int32(qa_type),
            "index": np.int32(index),
            "valid": np.bool_(True),
        }
        source = f"{self.source_name} record {index} (id {records.as_str(record.get(records.ID, '?'))})"
        if spec.wants_image:
            data = record[records.IMAGE]
            if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3:
                image = data  # already decoded by TFDS
                if image.shape[:2] != (spec.image_size, spec.image_size):
                    image = records.decode_image(
                        records.encode_png(image), source=source, size=spec.image_size
                    )
            else:
                image = records.decode_image(bytes(data), source=source, size=spec.image_size)
            out["image"] = image
        if spec.wants_codes:
            if records.IMAGE_CODES not in record:
                raise UserError(
                    f"{self.source_name} has no {records.IMAGE_CODES!r} field; derive a dataset "
                    "with image codes first or set data.image_field='image'"
                )
            out["image_codes"] = np.asarray(record[records.IMAGE_CODES], np.int32).reshape(-1)
        for name in spec.extra_fields:
            if name not in record:
                raise UserError(
                    f"{self.source_name} has no field {name!r} (listed in data.extra_fields)"
                )
            out[name] = np.asarray(record[name], np.float32)
        return out


def open_split(data: Any, split: str, data_dir: str | None = None):
    """The random-access data source of `split` of the dataset named in `data`.

    Images are left PNG-encoded (decoded by the pipeline, with a clear error if corrupt).
    Returns (source, name) where name is "dataset/config:split" for messages.
    """
    data_dir = data_dir or data.data_dir
    config_name = data.get("config_name") or None
    builder = records.load_builder(data_dir, data.dataset, config_name)
    splits = list(builder.info.splits.keys())
    if split not in splits:
        raise UserError(f"{data.dataset} has no split {split!r}; splits: {', '.join(splits)}")
    source = records.encoded_source(builder, split)
    name = f"{data.dataset}{'/' + config_name if config_name else ''}:{split}"
    return source, name


def load_tokenizer(data: Any):
    """The text tokenizer named in `data.tokenizer`; checks `vocab_size` when it is set (> 0)."""
    from unif2ace_jax.data.text_tokenizer import make_text_tokenizer

    tok_cfg = data.tokenizer
    tok = make_text_tokenizer(tok_cfg.name, tok_cfg.model_path)
    expected = int(tok_cfg.get("vocab_size", 0) or 0)
    if expected and tok.vocab_size != expected:
        raise UserError(
            f"text tokenizer {tok_cfg.model_path} has {tok.vocab_size} ids but "
            f"data.tokenizer.vocab_size is {expected}"
        )
    return tok


def _process_index_count(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

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
    import grain

    data = config.data if hasattr(config, "data") else config
    process_index, process_count = _process_index_count(process_index, process_count)
    spec = element_spec(data)
    batch = per_host_batch_size(int(data.batch_size), process_count)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(data)
    source, name = open_split(data, split or data.get("train_split", "train"), data_dir)
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
    tokenizer=None,
    process_index: int | None = None,
    process_count: int | None = None,
    split: str | None = None,
    data_dir: str | None = None,
    num_threads: int | None = None,
    prefetch: int | None = None,
    num_workers: int | None = None,
):
    """A checkpointable iterator of training raw batches (see module docstring).

    Args:
      config: the experiment config (its `data` section is used) or the `data` section.
      tokenizer: a `TextTokenizer`; default: the one named in `data.tokenizer`.
      process_index, process_count: this host's slice; default `jax.process_index/count()`.
      split: default `data.train_split` ("train").
      num_threads, prefetch: grain read threads and prefetch depth (in batches); default
        `data.num_threads` / `data.prefetch`.
      num_workers: > 0 runs the pipeline in that many grain worker processes
        (`mp_prefetch`; same batches, same order); default `data.num_workers` (0).
    Returns:
      a `grain.DatasetIterator` yielding dicts of numpy arrays; `get_state()/set_state()`.
    """
    import grain

    data = config.data if hasattr(config, "data") else config
    ds = make_train_dataset(
        config, tokenizer=tokenizer, process_index=process_index, process_count=process_count,
        split=split, data_dir=data_dir,
    )
    threads = int(num_threads if num_threads is not None else data.get("num_threads", 2))
    depth = int(prefetch if prefetch is not None else data.get("prefetch", 4))
    workers = int(num_workers if num_workers is not None else data.get("num_workers", 0))
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
    from absl import flags

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
    import grain

    data = config.data if hasattr(config, "data") else config
    if task not in ("t2i", "mmu"):
        raise UserError(f"eval task must be 't2i' or 'mmu', got {task!r}")
    process_index, process_count = _process_index_count(process_index, process_count)
    spec = dataclasses.replace(element_spec(data), t2i_short_caption_prob=0.0)  # whole captions
    global_batch = int(batch_size or data.get("eval_batch_size", data.batch_size))
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
    threads = int(data.get("num_threads", 2))
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
    import grain

    return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator):
    """Orbax args that restore a saved state into `iterator` (a freshly made one) in place."""
    import grain

    return grain.checkpoint.CheckpointRestore(iterator)
