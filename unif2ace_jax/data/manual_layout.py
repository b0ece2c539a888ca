"""Reads a local, manually downloaded copy of UniF2ace-130K, whatever its common layout.

The published copy (Hugging Face `tulvgengenr/UniF2ace-130K`) has a layout not known here, so
`scan_manual_dir` accepts the usual ones and fails with one UserError that lists what it found
and what it expected otherwise:

* **parquet** files (`*.parquet`, any depth). Columns (matched case-insensitively, first match
  wins):
    - image: one of `IMAGE_COLUMNS` holding encoded bytes, a Hugging Face image struct
      `{bytes, path}`, or a path string; or a path column from `IMAGE_PATH_COLUMNS`;
    - caption: one of `CAPTION_COLUMNS` (a string, or a list whose first entry is used);
    - QA: one of `QA_COLUMNS`, as a list or a JSON string of: `{question, answer}` dicts
      (also `q/a`, `query/response`), `[question, answer]` pairs, or chat turns
      `{from|role: human|user|gpt|assistant, value|content}` paired user -> assistant;
    - optional id (`ID_COLUMNS`) and `split` columns.
  At least an image and one of caption / QA are required.
* **json / jsonl** metadata (`*.json`, `*.jsonl`) with the same field names, one record per
  line (jsonl) or a JSON list / `{"data"|"annotations"|"images"|...: [...]}` / a dict
  `{id: record}`; images are files named by the image or path field, looked up relative to the
  metadata file, then to the manual dir, then by file name anywhere under it.

Splits come from a `split` column, else from a `train` / `test` / `val[idation]` part in the
file's path, else everything is `train`. When no test split exists, `test_fraction` of the
train examples (chosen by a hash of the id, so stable) form the `test` split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Iterator

import pyarrow.parquet as pq

from unif2ace_jax.errors import UserError

IMAGE_COLUMNS = ("image", "img", "image_bytes", "jpg", "jpeg", "png", "picture", "photo")
IMAGE_PATH_COLUMNS = (
    "image_path", "img_path", "file_name", "filename", "image_file", "image_name",
    "img_name", "file", "path",
)
CAPTION_COLUMNS = (
    "caption", "captions", "dense_caption", "long_caption", "description", "text", "prompt",
)
QA_COLUMNS = (
    "qa", "qas", "vqa", "qa_pairs", "qa_list", "conversations", "conversation", "dialog",
    "dialogue", "questions",
)
ID_COLUMNS = ("id", "image_id", "uid", "key", "idx", "sample_id", "name")
SPLIT_COLUMN = "split"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
METADATA_EXTENSIONS = (".parquet", ".jsonl", ".json")
_LIST_KEYS = ("data", "annotations", "images", "items", "records", "samples", "examples")

_SPLIT_ALIASES = {"train": "train", "training": "train", "test": "test", "testing": "test",
                  "val": "validation", "valid": "validation", "validation": "validation",
                  "dev": "validation", "eval": "validation"}
_SPLIT_RE = re.compile(
    r"(?:^|[/_.\-])(train|training|test|testing|validation|valid|val|dev|eval)(?=$|[/_.\-0-9])"
)


@dataclasses.dataclass
class RawExample:
    """One example read from the manual copy, before image decoding."""

    id: str
    split: str
    caption: str
    qa: list[tuple[str, str, str]]  # (question, answer, type)
    image_bytes: bytes | None
    image_path: str | None
    source: str  # for error messages: "file.parquet row 12" or a path


@dataclasses.dataclass
class _Columns:
    image: str | None
    image_path: str | None
    caption: str | None
    qa: str | None
    id: str | None
    split: str | None


@dataclasses.dataclass
class ManualLayout:
    """What `scan_manual_dir` found: metadata files of one kind and their column mapping."""

    manual_dir: str
    kind: str  # "parquet" | "json"
    files: list[str]
    columns: dict[str, _Columns]
    test_fraction: float
    _image_index: dict[str, str] | None = None

    def has_explicit_test(self) -> bool:
        if any(split_from_path(os.path.relpath(f, self.manual_dir)) == "test" for f in self.files):
            return True
        return any(c.split for c in self.columns.values())

    def examples(self, split: str) -> Iterator[RawExample]:
        """Examples of `split`, in file order."""
        for ex in self._examples():
            if ex.split == split:
                yield ex

    def split_counts(self) -> dict[str, int]:
        """Examples per split, from the id / split columns only (images are not read)."""
        counts: dict[str, int] = {}
        for ex in self._examples(light=True):
            counts[ex.split] = counts.get(ex.split, 0) + 1
        return counts

    def _examples(self, light: bool = False) -> Iterator[RawExample]:
        carve = not self.has_explicit_test()
        for f in self.files:
            for ex in self._file_examples(f, light):
                if carve and ex.split == "train" and _in_fraction(ex.id, self.test_fraction):
                    ex.split = "test"
                yield ex

    def _file_examples(self, path: str, light: bool) -> Iterator[RawExample]:
        cols = self.columns[path]
        rel = os.path.relpath(path, self.manual_dir)
        file_split = split_from_path(rel) or "train"
        if self.kind == "parquet":
            wanted = [c for c in (cols.id, cols.split) if c] if light else None
            rows = _parquet_rows(path, wanted)
        else:
            rows = _json_rows(path)
        for i, row in enumerate(rows):
            source = f"{rel} row {i}"
            rid = _as_text(row.get(cols.id)) if cols.id else ""
            rid = rid or f"{rel}:{i}"
            split = file_split
            if cols.split and row.get(cols.split) is not None:
                split = _SPLIT_ALIASES.get(str(row[cols.split]).strip().lower(), str(row[cols.split]))
            if light:
                yield RawExample(rid, split, "", [], None, None, source)
                continue
            caption = _caption(row.get(cols.caption)) if cols.caption else ""
            qa = parse_qa(row.get(cols.qa), source) if cols.qa else []
            image_bytes, image_path = self._image(row, cols, path, source)
            yield RawExample(rid, split, caption, qa, image_bytes, image_path, source)

    def _image(
        self, row: dict, cols: _Columns, meta_path: str, source: str
    ) -> tuple[bytes | None, str | None]:
        value = row.get(cols.image) if cols.image else None
        if isinstance(value, dict):
            if value.get("bytes"):
                return bytes(value["bytes"]), None
            value = value.get("path")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value), None
        if not value and cols.image_path:
            value = row.get(cols.image_path)
        if not value:
            raise UserError(
                f"{source}: no image (columns {cols.image!r} / {cols.image_path!r} are empty)"
            )
        return None, self.resolve_image(str(value), meta_path, source)

    def resolve_image(self, name: str, meta_path: str, source: str) -> str:
        for base in (os.path.dirname(meta_path), self.manual_dir):
            p = os.path.normpath(os.path.join(base, name))
            if os.path.isfile(p):
                return p
        if self._image_index is None:
            self._image_index = {}
            for root, _, files in os.walk(self.manual_dir):
                for fn in files:
                    if fn.lower().endswith(IMAGE_EXTENSIONS):
                        self._image_index.setdefault(fn, os.path.join(root, fn))
        p = self._image_index.get(os.path.basename(name))
        if p is None:
            raise UserError(f"{source}: image file {name!r} not found under {self.manual_dir}")
        return p


def split_from_path(rel_path: str) -> str | None:
    """"train" / "test" / "validation" from a path like `data/test-00000-of-00002.parquet`."""
    m = _SPLIT_RE.findall(rel_path.lower())
    return _SPLIT_ALIASES[m[-1]] if m else None


def _in_fraction(key: str, fraction: float) -> bool:
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return h / 2**64 < fraction


def scan_manual_dir(manual_dir: str, test_fraction: float = 0.01) -> ManualLayout:
    """Finds the metadata files and maps their columns; UserError when the layout is unknown."""
    if not manual_dir or not os.path.isdir(manual_dir):
        raise UserError(f"manual directory does not exist: {manual_dir!r}")
    all_files = []
    for root, dirs, files in os.walk(manual_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        all_files += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
    parquet = [f for f in all_files if f.lower().endswith(".parquet")]
    jsons = [f for f in all_files if f.lower().endswith((".json", ".jsonl"))]
    expected = (
        "expected parquet files, or json/jsonl metadata plus image files, with an image column "
        f"(one of {', '.join(IMAGE_COLUMNS + IMAGE_PATH_COLUMNS)}) and a caption column "
        f"(one of {', '.join(CAPTION_COLUMNS)}) and/or a QA column (one of {', '.join(QA_COLUMNS)})"
    )
    if parquet:
        kind, files = "parquet", parquet
    elif jsons:
        kind, files = "json", jsons
    else:
        shown = [os.path.relpath(f, manual_dir) for f in all_files[:15]]
        more = f" (+{len(all_files) - 15} more)" if len(all_files) > 15 else ""
        raise UserError(
            f"unrecognised UniF2ace-130K layout in {manual_dir}: found files "
            f"[{', '.join(shown) or 'none'}]{more}; {expected}"
        )
    columns: dict[str, _Columns] = {}
    problems = []
    for f in files:
        names = _parquet_columns(f) if kind == "parquet" else _json_columns(f)
        cols = _match_columns(names)
        if cols is None:
            problems.append(f"{os.path.relpath(f, manual_dir)}: columns [{', '.join(names) or 'none'}]")
        else:
            columns[f] = cols
    if kind == "json":
        # Stray json files (configs, dataset_info.json) are skipped if at least one file is usable.
        files = [f for f in files if f in columns]
        if files:
            problems = []
    if problems or not files:
        raise UserError(
            f"unrecognised UniF2ace-130K layout in {manual_dir}: found {kind} files with "
            f"{'; '.join(problems[:5])}; {expected}"
        )
    return ManualLayout(manual_dir, kind, files, columns, test_fraction)


def _match_columns(names: list[str]) -> _Columns | None:
    lower = {n.lower(): n for n in names}

    def pick(cands):
        for c in cands:
            if c in lower:
                return lower[c]
        return None

    image = pick(IMAGE_COLUMNS)
    image_path = pick(IMAGE_PATH_COLUMNS)
    caption = pick(CAPTION_COLUMNS)
    qa = pick(QA_COLUMNS)
    if (image is None and image_path is None) or (caption is None and qa is None):
        return None
    return _Columns(image, image_path, caption, qa, pick(ID_COLUMNS), lower.get(SPLIT_COLUMN))


def _parquet_columns(path: str) -> list[str]:
    try:
        return list(pq.read_schema(path).names)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for broken files
        raise UserError(f"cannot read parquet file {path}: {' '.join(str(e).split())[:200]}") from None


def _parquet_rows(path: str, columns: list[str] | None = None) -> Iterator[dict]:
    try:
        pf = pq.ParquetFile(path)
        if columns == []:  # only the row count is needed
            yield from ({} for _ in range(pf.metadata.num_rows))
            return
        for batch in pf.iter_batches(batch_size=256, columns=columns):
            yield from batch.to_pylist()
    except UserError:
        raise
    except Exception as e:
        if type(e).__module__.startswith("pyarrow"):
            message = " ".join(str(e).split())[:200]
            raise UserError(f"cannot read parquet file {path}: {message}") from None
        raise


def _json_records(path: str) -> list[dict]:
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    try:
        if path.lower().endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON in {path}: {e}") from None
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        for k in _LIST_KEYS:
            if isinstance(data.get(k), list):
                return [r for r in data[k] if isinstance(r, dict)]
        values = list(data.values())
        if values and all(isinstance(v, dict) for v in values):
            # {id: record}: the key is the id (and the image name when no image field).
            return [{"id": k, "image_path": k, **v} for k, v in data.items()]
    return []


def _json_columns(path: str) -> list[str]:
    names: dict[str, None] = {}
    for r in _json_records(path)[:100]:
        names.update(dict.fromkeys(r))
    return list(names)


def _json_rows(path: str) -> Iterator[dict]:
    yield from _json_records(path)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _caption(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if v), "")
    if isinstance(value, dict):
        value = next((value[k] for k in ("caption", "text", "value") if k in value), "")
    return _as_text(value).strip()


_USER_ROLES = ("human", "user", "question", "q")
_BOT_ROLES = ("gpt", "assistant", "bot", "answer", "a", "model")


def parse_qa(value: Any, source: str = "") -> list[tuple[str, str, str]]:
    """QA pairs as (question, answer, type) from the common encodings (module docstring).

    Raises UserError naming `source` for a value that is none of them.
    """
    if value is None or (isinstance(value, float) and value != value):
        return []
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"{source}: QA field is a string but not JSON: {value[:80]!r}") from None
    if isinstance(value, dict):
        for k in ("conversations", "conversation", "qa", "qas"):
            if k in value:
                return parse_qa(value[k], source)
        q, a = _get(value, ("question", "q", "query")), _get(value, ("answer", "a", "response"))
        if isinstance(q, list) and isinstance(a, list):
            return [(_clean(x), _clean(y), "other") for x, y in zip(q, a)]
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{source}: unrecognised QA value of type {type(value).__name__}")
    out: list[tuple[str, str, str]] = []
    pending_q: str | None = None
    for item in value:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            out.append((_clean(item[0]), _clean(item[1]), "other"))
        elif isinstance(item, dict):
            role = _get(item, ("from", "role", "speaker"))
            if role is not None:
                text = _clean(_get(item, ("value", "content", "text")) or "")
                role = str(role).lower()
                if role in _USER_ROLES:
                    pending_q = text
                elif role in _BOT_ROLES and pending_q is not None:
                    out.append((pending_q, text, "conversation"))
                    pending_q = None
                continue
            q = _get(item, ("question", "q", "query", "prompt"))
            a = _get(item, ("answer", "a", "response", "output"))
            if q is None or a is None:
                raise UserError(f"{source}: QA item without question/answer keys: {sorted(item)}")
            qtype = _get(item, ("type", "qa_type", "category", "kind")) or "other"
            out.append((_clean(q), _clean(a), str(qtype)))
        else:
            raise UserError(f"{source}: unrecognised QA item {str(item)[:80]!r}")
    return out


def _get(d: dict, keys: tuple[str, ...]) -> Any:
    lower = {str(k).lower(): v for k, v in d.items()}
    for k in keys:
        if k in lower:
            return lower[k]
    return None


def _clean(text: Any) -> str:
    text = _as_text(text).replace("<image>", "")
    return " ".join(text.split())
