"""`python -m unif2ace_jax.data`: build / train_tokenizer / inspect, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from unif2ace_jax.data import records


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unif2ace_jax.data", *args], capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("cli") / "data")
    proc = _run("build", "--dataset=synthface", "--num_train=10", "--num_test=2", "--num_heldout=2",
                f"--data_dir={d}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d, proc


def test_build_reports_splits_and_shows_progress(built):
    d, proc = built
    assert "built " in proc.stdout and "train: 10 examples" in proc.stdout
    assert "test_heldout_combos: 2 examples" in proc.stdout
    assert "examples" in proc.stderr  # TFDS's progress bars
    assert records.list_datasets(d) == ["synthface/custom_64_10_2_2_s0"]


def test_inspect(built):
    d, _ = built
    proc = _run("inspect", f"--data_dir={d}", "--dataset=synthface")
    assert proc.returncode == 0, proc.stderr[-2000:]
    src = records.load_builder(d, "synthface").as_data_source("train")
    rec = src[0]
    assert "train: 10 examples" in proc.stdout
    assert records.as_str(rec["caption"]) in proc.stdout
    assert "image: uint8 [64, 64, 3]" in proc.stdout
    first_q = records.qa_rows(rec["qa"])[0]
    assert f"{first_q['question']} -> {first_q['answer']}" in proc.stdout
    listing = _run("inspect", f"--data_dir={d}")
    assert "synthface/custom_64_10_2_2_s0" in listing.stdout


def test_train_tokenizer(built, tmp_path):
    d, _ = built
    out = tmp_path / "text.model"
    proc = _run("train_tokenizer", f"--data_dir={d}", "--vocab_size=120", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "120 pieces" in proc.stdout
    from unif2ace_jax.data.text_tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(out)
    caption = records.as_str(records.load_builder(d, "synthface").as_data_source("train")[0]["caption"])
    assert tok.decode(tok.encode(caption)) == caption
    line = _one_error_line(
        _run("train_tokenizer", f"--data_dir={d}", "--vocab_size=100000", f"--out={out}"))
    assert "too large" in line


@pytest.mark.parametrize(
    "args, expected",
    [
        (["build", "--dataset=celeba", "--data_dir={tmp}/d"],
         "unknown dataset 'celeba'; known: synthface, unif2ace_130k"),
        (["build", "--dataset=synthface", "--config_name=huge_64", "--data_dir={tmp}/d"],
         "unknown synthface config 'huge_64'"),
        (["build", "--dataset=unif2ace_130k", "--manual_dir={tmp}/missing", "--data_dir={tmp}/d"],
         "manual directory does not exist"),
        (["build", "--dataset=unif2ace_130k", "--config_name=res_7", "--manual_dir={tmp}",
          "--data_dir={tmp}/d"], "unknown unif2ace_130k config"),
        (["build", "--dataset=synthface", "--data_dir={tmp}/no/such/dir"], "does not exist"),
        (["inspect", "--data_dir={tmp}/missing", "--dataset=synthface"],
         "data directory does not exist"),
        (["train_tokenizer", "--data_dir={tmp}", "--out={tmp}/x.model"], "no dataset 'synthface'"),
        (["frobnicate"], "expected one command"),
        (["build", "--dataset=synthface", "--data_dir={tmp}/d", "--num_train=x"], "num_train"),
    ],
)
def test_bad_input_gives_one_error_line(tmp_path, args, expected):
    line = _one_error_line(_run(*[a.format(tmp=tmp_path) for a in args]))
    assert expected in line
    assert not (tmp_path / "d").exists() or records.list_datasets(str(tmp_path / "d")) == []


def test_corrupt_image_fails_without_a_partial_dataset(tmp_path):
    from PIL import Image

    copy = tmp_path / "copy"
    os.makedirs(copy / "img")
    lines = []
    for i in range(4):
        path = copy / "img" / f"f{i}.png"
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(path)
        if i == 2:
            path.write_bytes(path.read_bytes()[:25])
        lines.append(json.dumps({"image": f"img/f{i}.png", "caption": f"face {i}"}))
    (copy / "train.jsonl").write_text("\n".join(lines))
    out = tmp_path / "out"
    line = _one_error_line(_run("build", "--dataset=unif2ace_130k", f"--manual_dir={copy}",
                                f"--data_dir={out}", "--image_size=16"))
    assert "corrupt image" in line and "f2.png" in line
    assert not out.exists(), sorted(str(p) for p in out.rglob("*"))
    ok = _run("build", "--dataset=unif2ace_130k", f"--manual_dir={copy}", f"--data_dir={out}",
              "--image_size=16", "--skip_corrupt", "--test_fraction=0")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "skipped 1 corrupt images" in ok.stdout
    assert "train: 3 examples" in ok.stdout


def test_export_writes_faces_and_truth(built, tmp_path):
    from PIL import Image

    d, _ = built
    out = tmp_path / "faces"
    proc = _run("export", f"--data_dir={d}", "--dataset=synthface", "--split=test", "--num=5",
                f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    faces = json.loads((out / "faces.json").read_text())
    assert [f["file"] for f in faces] == ["face_0.png", "face_1.png"]  # the split has 2 faces
    src = records.encoded_source(records.load_builder(d, "synthface"), "test")
    for i, face in enumerate(faces):
        img = np.asarray(Image.open(out / face["file"]))
        expected = records.decode_image(bytes(src[i]["image"]), source="test")
        np.testing.assert_array_equal(img, expected)
        assert face["caption"] == records.as_str(src[i]["caption"])
        assert face["qa"] == records.qa_rows(src[i]["qa"])
    assert not os.path.exists(str(out) + ".tmp")
    bad = _run("export", f"--data_dir={d}", "--split=validation", f"--out={tmp_path / 'x'}")
    assert "validation" in _one_error_line(bad)
    assert not (tmp_path / "x").exists()
