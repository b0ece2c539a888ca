"""`python -m unif2ace_jax.main`: the stage list, skipping finished stages, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unif2ace_jax.main", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_dry_run_lists_every_stage_in_order(tmp_path):
    proc = _main(f"--workdir={tmp_path}", "--dry_run", "--unified_override=total_steps=7")
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = [line[3:] for line in proc.stdout.splitlines()
              if line.startswith("== ") and ":" not in line]
    assert stages == ["data", "text_tokenizer", "judge", "tokenizer", "pretokenize", "encoders",
                      "embeddings", "unified",
                      "generate", "ask", "evaluate"]
    commands = [line[2:] for line in proc.stdout.splitlines() if line.startswith("$ ")]
    train = [c for c in commands if "-m unif2ace_jax.train " in c]
    assert len(train) == 1 and "--config.total_steps=7" in train[0]
    assert f"--config.data.data_dir={tmp_path}/data" in train[0]
    assert any("-m unif2ace_jax.evaluate " in c and "--split=test_heldout_combos" in c
               for c in commands)
    assert not os.path.exists(tmp_path / "summary.json")  # a dry run writes nothing


def test_finished_stages_are_skipped_and_answers_collected(tmp_path):
    faces = tmp_path / "ask_faces"
    faces.mkdir()
    (faces / "faces.json").write_text(json.dumps(
        [{"file": "face_0.png", "caption": "c", "attributes": {"hair_color": "red"}, "qa": []}]))
    (faces / "answers_0.txt").write_text("What color is the person's hair? -> red\n")
    (tmp_path / "answers.json").write_text("{}")
    proc = _main(f"--workdir={tmp_path}", "--stages=ask")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "== ask: done already" in proc.stdout
    collected = _main(f"--workdir={tmp_path}", "--collect_answers")
    result = json.loads(collected.stdout)
    assert result["answers"] == [{"face": "face_0.png", "question": "What color is the "
                                  "person's hair?", "answer": "red"}]
    assert result["attributes"] == [{"hair_color": "red"}]


def test_unknown_stage_is_one_error_line(tmp_path):
    proc = _main(f"--workdir={tmp_path}", "--stages=data,bogus")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bogus" in errors[0]
