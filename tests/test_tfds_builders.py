"""TFDS builders: synthface and unif2ace_130k (fake manual copies), read back without TensorFlow."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from unif2ace_jax.data import manual_layout, records, synthface
from unif2ace_jax.data.build import build_dataset
from unif2ace_jax.data.tfds_synthface import make_synthface_builder
from unif2ace_jax.errors import UserError

SIZES = {"train": 12, "test": 4, "test_heldout_combos": 4}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("synth"))
    build_dataset("synthface", d, num_train=SIZES["train"], num_test=SIZES["test"],
                  num_heldout=SIZES["test_heldout_combos"], seed=3)
    return d


def test_synthface_records_equal_the_generator(synth_dir):
    builder = records.load_builder(synth_dir, "synthface")
    assert builder.info.config_name == "custom_64_12_4_4_s3"
    assert {k: v.num_examples for k, v in builder.info.splits.items()} == SIZES
    assert builder.info.metadata["attributes"]["hair_color"] == list(synthface.ATTRIBUTES["hair_color"])
    for split, n in SIZES.items():
        source = builder.as_data_source(split=split)
        want = list(synthface.generate(3, n, image_size=64, split=split))
        assert len(source) == n
        for i, ex in enumerate(want):
            rec = source[i]
            assert records.as_str(rec["id"]) == ex["id"]
            np.testing.assert_array_equal(rec["image"], ex["image"])  # PNG is lossless
            assert records.as_str(rec["caption"]) == ex["caption"]
            assert json.loads(records.as_str(rec["attributes"])) == ex["attributes"]
            rows = records.qa_rows(rec["qa"])
            assert [(r["question"], r["answer"]) for r in rows] == [tuple(p) for p in ex["qa"]]
            assert [r["type"] for r in rows] == ex["qa_types"]
            assert [r["attribute"] for r in rows] == ex["qa_attributes"]


def test_build_and_read_without_tensorflow(tmp_path):
    code = f"""
        import sys
        from unif2ace_jax.data.build import build_dataset
        from unif2ace_jax.data import records
        build_dataset("synthface", {str(tmp_path)!r}, num_train=3, num_test=1, num_heldout=1)
        src = records.load_builder({str(tmp_path)!r}, "synthface").as_data_source("train")
        assert src[2]["image"].shape == (64, 64, 3)
        assert "tensorflow" not in sys.modules, "TensorFlow was imported"
        print("ok")
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_synthface_bad_configs(tmp_path):
    with pytest.raises(UserError, match="unknown synthface config 'huge'.*small_64"):
        make_synthface_builder(str(tmp_path), config_name="huge")
    with pytest.raises(UserError, match="image_size"):
        make_synthface_builder(str(tmp_path), image_size=100)
    presets = {c: make_synthface_builder(str(tmp_path), config_name=c).builder_config
               for c in ("tiny_64", "small_64", "small_256")}
    small = presets["small_64"]
    assert (small.num_train, small.num_test, small.num_heldout) == (20000, 1000, 1000)
    assert presets["small_256"].image_size == 256


def test_synthface_parallel_build_is_identical(tmp_path):
    a = build_dataset("synthface", str(tmp_path / "a"), num_train=140, num_test=0, num_heldout=0)
    b = build_dataset("synthface", str(tmp_path / "b"), num_train=140, num_test=0, num_heldout=0,
                      num_workers=2)
    sa = records.load_builder(str(tmp_path / "a"), "synthface").as_data_source("train")
    sb = records.load_builder(str(tmp_path / "b"), "synthface").as_data_source("train")
    assert a != b and len(sa) == len(sb) == 140
    for i in range(0, 140, 13):
        assert sa[i]["id"] == sb[i]["id"] and sa[i]["caption"] == sb[i]["caption"]
        np.testing.assert_array_equal(sa[i]["image"], sb[i]["image"])


# ---------------------------------------------------------------- UniF2ace-130K fake copies


def _image(seed: int, w: int = 40, h: int = 30) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _reference(data: bytes, size: int) -> np.ndarray:
    """Center square crop + bicubic resize with PIL directly (independent of records.py)."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(im.resize((size, size), Image.Resampling.BICUBIC))


def _write_parquet_copy(root) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(root / "data")
    truth = {}
    for split, n in (("train", 5), ("test", 2)):
        rows = []
        for i in range(n):
            data = _encode(_image(100 * (split == "test") + i))
            conv = [
                {"from": "human", "value": f"<image>\nWhat colour is the hair of face {i}?"},
                {"from": "gpt", "value": f"brown {i}"},
                {"from": "human", "value": "Is the person smiling?"},
                {"from": "gpt", "value": "yes"},
            ]
            rid = f"{split}_{i:03d}"
            rows.append({"image": {"bytes": data, "path": f"{rid}.png"},
                         "caption": f"A face number {i}.", "conversations": conv, "image_id": rid})
            qa = [(f"What colour is the hair of face {i}?", f"brown {i}"),
                  ("Is the person smiling?", "yes")]
            truth[rid] = (split, data, f"A face number {i}.", qa)
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"{split}-00000-of-00001.parquet")
    (root / "README.md").write_text("fake copy")
    return truth


def _write_jsonl_copy(root, n: int = 8, corrupt: int | None = None) -> dict:
    os.makedirs(root / "images")
    truth, lines = {}, []
    for i in range(n):
        fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
        data = _encode(_image(i, 48, 64), fmt)
        if i == corrupt:
            data = data[:40]  # truncated file
        (root / "images" / f"face_{i}.{ext}").write_bytes(data)
        qa = [{"question": f"q{i}?", "answer": f"a{i}", "type": "description"}]
        lines.append(json.dumps({"file_name": f"images/face_{i}.{ext}", "text": f"caption {i}",
                                 "qa": json.dumps(qa), "id": f"face_{i}"}))
        truth[f"face_{i}"] = (data, f"caption {i}", [(f"q{i}?", f"a{i}")])
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return truth


def test_unif2ace_parquet_layout(tmp_path):
    copy = tmp_path / "copy"
    truth = _write_parquet_copy(copy)
    out = str(tmp_path / "tfds")
    path = build_dataset("unif2ace_130k", out, manual_dir=str(copy), image_size=32)
    builder = records.load_builder(out, "unif2ace_130k")
    assert path == os.fspath(builder.data_dir)
    seen = {}
    for split in ("train", "test"):
        source = builder.as_data_source(split=split)
        for i in range(len(source)):
            rec = source[i]
            rid = records.as_str(rec["id"])
            want_split, data, caption, qa = truth[rid]
            assert want_split == split
            assert records.as_str(rec["caption"]) == caption
            rows = records.qa_rows(rec["qa"])
            assert [(r["question"], r["answer"]) for r in rows] == qa
            assert {r["type"] for r in rows} == {"conversation"}
            np.testing.assert_array_equal(rec["image"], _reference(data, 32))
            assert json.loads(records.as_str(rec["attributes"])) == {}
            seen[rid] = split
    assert set(seen) == set(truth)


def test_unif2ace_jsonl_layout_carves_a_test_split(tmp_path):
    copy = tmp_path / "copy"
    truth = _write_jsonl_copy(copy, n=12)
    out = str(tmp_path / "tfds")
    build_dataset("unif2ace_130k", out, manual_dir=str(copy), image_size=32, test_fraction=0.3)
    builder = records.load_builder(out, "unif2ace_130k")
    got = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split=split)
        for i in range(len(source)):
            rec = source[i]
            rid = records.as_str(rec["id"])
            data, caption, qa = truth[rid]
            assert records.as_str(rec["caption"]) == caption
            rows = records.qa_rows(rec["qa"])
            got_qa = [(r["question"], r["answer"], r["type"]) for r in rows]
            assert got_qa == [(q, a, "description") for q, a in qa]
            np.testing.assert_array_equal(rec["image"], _reference(data, 32))
            got[rid] = split
    assert set(got) == set(truth)
    for rid, split in got.items():  # the documented rule: sha256(id) below the fraction -> test
        h = int.from_bytes(hashlib.sha256(rid.encode()).digest()[:8], "little") / 2**64
        assert split == ("test" if h < 0.3 else "train")


def test_unif2ace_corrupt_image_fails_cleanly_or_is_skipped(tmp_path):
    copy = tmp_path / "copy"
    _write_jsonl_copy(copy, n=6, corrupt=3)
    out = tmp_path / "tfds"
    with pytest.raises(UserError, match=r"corrupt image .*face_3\.jpg"):
        build_dataset("unif2ace_130k", str(out), manual_dir=str(copy), image_size=32, test_fraction=0.0)
    assert not out.exists() or records.list_datasets(str(out)) == []
    leftovers = [r for r, _, _ in os.walk(out)] if out.exists() else []
    assert not any("incomplete" in r for r in leftovers)
    build_dataset("unif2ace_130k", str(out), manual_dir=str(copy), image_size=32, test_fraction=0.0,
                  skip_corrupt=True)
    builder = records.load_builder(str(out), "unif2ace_130k")
    ids = [records.as_str(r["id"]) for r in builder.as_data_source("train")]
    assert sorted(ids) == [f"face_{i}" for i in range(6) if i != 3]


def test_unif2ace_unrecognised_layouts(tmp_path):
    copy = tmp_path / "copy"
    os.makedirs(copy)
    (copy / "notes.txt").write_text("x")
    (copy / "table.csv").write_text("a,b\n1,2\n")
    match = r"unrecognised UniF2ace-130K layout.*notes\.txt.*table\.csv.*expected parquet"
    with pytest.raises(UserError, match=match):
        build_dataset("unif2ace_130k", str(tmp_path / "out"), manual_dir=str(copy))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"pixels": [b"x"], "label": [1]}), copy / "train.parquet")
    with pytest.raises(UserError, match=r"columns \[pixels, label\].*caption column"):
        build_dataset("unif2ace_130k", str(tmp_path / "out"), manual_dir=str(copy))
    with pytest.raises(UserError, match="manual directory does not exist"):
        build_dataset("unif2ace_130k", str(tmp_path / "out"), manual_dir=str(tmp_path / "nope"))
    assert not (tmp_path / "out").exists() or records.list_datasets(str(tmp_path / "out")) == []


@pytest.mark.parametrize(
    "value, want",
    [
        (None, []),
        ("", []),
        ([{"question": "Q1", "answer": "A1"}], [("Q1", "A1", "other")]),
        ('[{"q": "Q1", "a": "A1", "type": "count"}]', [("Q1", "A1", "count")]),
        ([["Q1", "A1"], ("Q2", "A2")], [("Q1", "A1", "other"), ("Q2", "A2", "other")]),
        ({"question": ["Q1", "Q2"], "answer": ["A1", "A2"]},
         [("Q1", "A1", "other"), ("Q2", "A2", "other")]),
        ([{"role": "user", "content": "<image> Q1"}, {"role": "assistant", "content": "A1"}],
         [("Q1", "A1", "conversation")]),
        ({"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}]},
         [("Q1", "A1", "conversation")]),
    ],
)
def test_parse_qa_formats(value, want):
    assert manual_layout.parse_qa(value, "src") == want


@pytest.mark.parametrize("value", ["not json", [{"foo": 1}], 42])
def test_parse_qa_rejects_unknown(value):
    with pytest.raises(UserError, match="src"):
        manual_layout.parse_qa(value, "src")


def test_split_from_path():
    assert manual_layout.split_from_path("data/train-00000-of-00002.parquet") == "train"
    assert manual_layout.split_from_path("data/test-00001-of-00002.parquet") == "test"
    assert manual_layout.split_from_path("val/meta.jsonl") == "validation"
    assert manual_layout.split_from_path("metadata.jsonl") is None
    assert manual_layout.split_from_path("contest/latest.json") is None


def test_decode_image_errors_name_the_source():
    with pytest.raises(UserError, match="corrupt image rec-7"):
        records.decode_image(b"\x89PNG\r\n\x1a\n garbage", source="rec-7")
    rgba = io.BytesIO()
    Image.fromarray(np.full((6, 10, 4), 9, np.uint8)).save(rgba, format="PNG")
    out = records.decode_image(rgba.getvalue(), size=4)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
