"""`python -m unif2ace_jax.main`: the stage list, skipping finished stages, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unif2ace_jax.main", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _stages_run(stdout: str) -> list[str]:
    return [line[3:] for line in stdout.splitlines() if line.startswith("== ") and ":" not in line]


def test_dry_run_lists_every_stage_in_order(tmp_path):
    proc = _main(f"--workdir={tmp_path}", "--dry_run", "--unified_override=total_steps=7",
                 "--eval_generate_heldout=40")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _stages_run(proc.stdout) == ["data", "text_tokenizer", "judge", "tokenizer",
                                        "tokenizer_eval", "pretokenize", "encoders",
                                        "embeddings", "unified", "generate", "ask", "evaluate"]
    commands = [line[2:] for line in proc.stdout.splitlines() if line.startswith("$ ")]
    train = [c for c in commands if "-m unif2ace_jax.train " in c]
    assert len(train) == 1 and "--config.total_steps=7" in train[0]
    assert f"--config.data.data_dir={tmp_path}/data" in train[0]
    assert "--config.data.dataset=synthface_codes_emb_face_clip " in train[0]
    evaluate = {c.split("--split=")[1].split()[0]: c for c in commands
                if "-m unif2ace_jax.evaluate " in c}
    assert sorted(evaluate) == ["test", "test_heldout_combos"]
    assert "--num_generate=1000 " in evaluate["test"]  # every SynthFace test caption
    assert "--num_generate=40 " in evaluate["test_heldout_combos"]
    assert not os.path.exists(tmp_path / "summary.json")  # a dry run writes nothing


def test_the_job_trains_and_embeds_only_the_encoders_the_model_reads(tmp_path):
    for variant, kinds in [("moe=seq", ["face", "clip"]), ("moe=seq,drop=clip", ["face"]),
                           ("moe=seq,drop=face", ["clip"])]:
        proc = _main(f"--workdir={tmp_path}", "--dry_run",
                     f"--unified_config=configs/synthface_tiny.py:{variant}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        commands = [line[2:] for line in proc.stdout.splitlines() if line.startswith("$ ")]
        trained = [c.split("--kind=")[1].split()[0] for c in commands
                   if "-m unif2ace_jax.train.encoders " in c]
        assert trained == kinds, variant
        embed = [c for c in commands if "-m unif2ace_jax.data.embeddings " in c]
        assert len(embed) == 1
        assert "--encoders=" + ",".join(f"synthface_{k}" for k in kinds) + " " in embed[0]
        dataset = "_".join(["synthface_codes_emb", *kinds])
        assert f"--name={dataset}" in embed[0]
        train = [c for c in commands if "-m unif2ace_jax.train " in c]
        assert len(train) == 1 and f"--config.data.dataset={dataset} " in train[0]


def test_models_without_expert_features_skip_the_encoder_stages(tmp_path):
    proc = _main(f"--workdir={tmp_path}", "--dry_run",
                 "--unified_config=configs/synthface_tiny.py:moe=token")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _stages_run(proc.stdout) == ["data", "text_tokenizer", "judge", "tokenizer",
                                        "tokenizer_eval", "pretokenize", "unified", "generate",
                                        "ask", "evaluate"]
    assert "== encoders: not needed" in proc.stdout and "== embeddings: not needed" in proc.stdout
    train = [line for line in proc.stdout.splitlines() if "-m unif2ace_jax.train " in line]
    assert len(train) == 1 and "--config.data.dataset=synthface_codes " in train[0]


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


def test_bad_unified_config_is_one_error_line(tmp_path):
    for spec, named in [("configs/nope.py:moe=seq", "configs/nope.py"),
                        ("configs/synthface_tiny.py:moe=bogus", "moe='bogus'")]:
        proc = _main(f"--workdir={tmp_path}", "--dry_run", f"--unified_config={spec}")
        assert proc.returncode == 2
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and named in errors[0], proc.stderr[-2000:]
        assert "$ " not in proc.stdout  # refused before any stage


def test_unknown_stage_is_one_error_line(tmp_path):
    proc = _main(f"--workdir={tmp_path}", "--stages=data,bogus")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bogus" in errors[0]
