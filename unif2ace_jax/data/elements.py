"""Raw elements: one dataset record -> one fixed-shape numpy element (no batch axis) of the
raw-batch contract in `data.pipeline`, built by `ElementBuilder`.

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
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from unif2ace_jax.data import records
from unif2ace_jax.data.ordering import CounterRng
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
    """ElementSpec from a config's whole `data` section (`pipeline.full_config`)."""
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
        extra_fields=tuple(data.extra_fields or ()),
        mixture=mixture_probabilities(mixture),
        seed=int(data.seed),
        lm_caption_prob=float(data.lm_caption_prob),
        mmu_caption_prob=_probability(data, "mmu_caption_prob"),
        caption_prompt=str(data.caption_prompt),
        mmu_questions_per_row=_positive(data, "mmu_questions_per_row"),
        t2i_short_caption_prob=_probability(data, "t2i_short_caption_prob"),
    )


def _positive(data: Any, name: str) -> int:
    value = int(data[name])
    if value < 1:
        raise UserError(f"data.{name} must be >= 1, got {value}")
    return value


def _probability(data: Any, name: str) -> float:
    value = float(data[name])
    if not 0.0 <= value <= 1.0:
        raise UserError(f"data.{name} must be in [0, 1], got {value}")
    return value


def caption_sentences(caption: str) -> list[str]:
    """The caption's sentences (split after ``.``, ``!`` or ``?`` and white space); ``[caption]``
    when it has none."""
    parts = [p for p in _SENTENCE_END.split(caption.strip()) if p]
    return parts or [caption]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


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
        """The raw element of `record` (`index` in its split) for `task`; `qa_index` picks the
        QA pair (evaluation) instead of drawing it with `rng`."""
        caption = records.as_str(record[records.CAPTION])
        qa = records.qa_rows(record[records.QA]) if records.QA in record else []
        task, captioning = self._resolve_task(task, caption, qa, rng, qa_index)
        answer_ids: list[int] = []
        qa_type = -1
        text_targets: list[bool] = []
        if captioning:
            text_ids, text_targets = self._captioning_text(caption)
        elif task == TASK_MMU:
            text_ids, text_targets, answer_ids, qa_type = self._qa_text(qa, rng, qa_index)
        elif task == TASK_LM:
            text_ids = self.tokenizer.encode(self._lm_text(caption, qa, rng))
        else:
            text_ids = self.tokenizer.encode(self._t2i_text(caption, rng))
        out = self._text_arrays(task, text_ids, text_targets, answer_ids, qa_type, index)
        out.update(self._record_arrays(index, record))
        return out

    def _resolve_task(self, task: int, caption: str, qa: list[dict], rng: CounterRng,
                      qa_index: int | None) -> tuple[int, bool]:
        """(the task the record can serve, whether an mmu row is captioning)."""
        captioning = False
        if task == TASK_MMU and qa_index is None and caption and self.spec.mmu_caption_prob > 0:
            captioning = not qa or rng.random() < self.spec.mmu_caption_prob
        if task == TASK_MMU and not qa and not captioning:
            task = TASK_T2I
        elif task == TASK_T2I and not caption and qa:
            task = TASK_MMU
        return task, captioning

    def _captioning_text(self, caption: str) -> tuple[list[int], list[bool]]:
        """Prompt then caption; the caption ids are the targets."""
        prompt_ids = self.tokenizer.encode(self.spec.caption_prompt)
        caption_ids = self.tokenizer.encode(caption)
        return prompt_ids + caption_ids, [False] * len(prompt_ids) + [True] * len(caption_ids)

    def _qa_text(self, qa: list[dict], rng: CounterRng, qa_index: int | None
                 ) -> tuple[list[int], list[bool], list[int], int]:
        """(text ids, text targets, answer ids, qa type) of an mmu QA row."""
        text_targets: list[bool] = []
        if qa_index is not None or self.spec.mmu_questions_per_row == 1:
            row = qa[qa_index if qa_index is not None else rng.integers(len(qa))]
            text_ids = self.tokenizer.encode(row["question"])
        else:
            row, text_ids, text_targets = self._packed_qa(qa, rng)
        answer_ids = self.tokenizer.encode(row["answer"])
        return text_ids, text_targets, answer_ids, records.qa_type_index(row.get("type", "other"))

    def _lm_text(self, caption: str, qa: list[dict], rng: CounterRng) -> str:
        if not qa or rng.random() < self.spec.lm_caption_prob:
            return caption
        row = qa[rng.integers(len(qa))]
        return f"{row['question']} {row['answer']}"

    def _t2i_text(self, caption: str, rng: CounterRng) -> str:
        """The caption, or with `t2i_short_caption_prob` its first 1..all sentences."""
        prob = self.spec.t2i_short_caption_prob
        if prob > 0 and rng.random() < prob:
            sentences = caption_sentences(caption)
            return " ".join(sentences[: 1 + rng.integers(len(sentences))])
        return caption

    def _text_arrays(self, task: int, text_ids: list[int], text_targets: list[bool],
                     answer_ids: list[int], qa_type: int, index: int) -> dict[str, np.ndarray]:
        spec = self.spec
        text_arr, text_len = _pad(text_ids, spec.max_text_len)
        ans_arr, ans_len = _pad(answer_ids, spec.max_answer_len)
        targets_arr = np.zeros(spec.max_text_len, bool)
        kept = text_targets[: spec.max_text_len]
        targets_arr[: len(kept)] = kept
        return {
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

    def _record_arrays(self, index: int, record: dict) -> dict[str, np.ndarray]:
        """The image, image codes and extra fields the spec asks for, from the record."""
        spec = self.spec
        out = {}
        if spec.wants_image:
            out["image"] = self._image(index, record)
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

    def _image(self, index: int, record: dict) -> np.ndarray:
        """uint8 [S, S, 3]: the record's image decoded (and resized when another size)."""
        size = self.spec.image_size
        source = f"{self.source_name} record {index} (id {records.as_str(record.get(records.ID, '?'))})"
        data = record[records.IMAGE]
        if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3:
            image = data  # already decoded by TFDS
            if image.shape[:2] != (size, size):
                image = records.decode_image(records.encode_png(image), source=source, size=size)
            return image
        return records.decode_image(bytes(data), source=source, size=size)
