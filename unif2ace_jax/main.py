"""The main job on the embedded default: data -> judge -> image tokenizer -> unified model.

    python -m unif2ace_jax.main --workdir=runs/default

Each stage is one of the project's own CLIs, printed before it runs, so every step can be
repeated by hand. A stage whose output already exists is skipped (the job resumes where an
interrupted run stopped; `--force=STAGE,...` reruns stages). Outputs under `--workdir`:

    data/                 SynthFace TFDS records (array_record) and the SentencePiece model
    judge/                the SynthFace attribute judge; judge_test.json its test accuracy
    tokenizer/            the LFQ image tokenizer; tokenizer_eval.json (PSNR, code usage, ...)
    data_coded/           the records with image codes added (pre-tokenised)
    unified/              the unified model; samples.png, answers.txt, eval_*.json
    summary.json          the figures of every stage
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Callable

from absl import flags

from unif2ace_jax.errors import UserError, run_cli

flags.DEFINE_string("workdir", "runs/default", "Where every stage writes its outputs.")
flags.DEFINE_string("stages", "all", "Comma-separated stages to run (default: all, in order).")
flags.DEFINE_string("force", "", "Comma-separated stages to rerun even if their output exists.")
flags.DEFINE_string("data_config", "small_64", "SynthFace builder config for the main job.")
flags.DEFINE_integer("text_vocab_size", 512, "SentencePiece vocabulary size.")
flags.DEFINE_bool("dry_run", False, "Print the commands without running them.")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    outputs: Callable[[str], list[str]]  # paths that exist once the stage has finished
    commands: Callable[[str], list[list[str]]]
    summary: Callable[[str], dict] = lambda workdir: {}


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        text = f.read().strip()
    # CLIs print one JSON object as their last line; stage logs may hold progress lines before it.
    return json.loads(text.splitlines()[-1]) if text else {}


def _data_dir(w: str) -> str:
    return os.path.join(w, "data")


def _text_model(w: str) -> str:
    return os.path.join(_data_dir(w), "synthface_text.model")


STAGES: list[Stage] = [
    Stage(
        "data",
        outputs=lambda w: [os.path.join(_data_dir(w), "synthface", FLAGS.data_config)],
        commands=lambda w: [_py("unif2ace_jax.data", "build", "--dataset=synthface",
                                f"--config_name={FLAGS.data_config}", f"--data_dir={_data_dir(w)}")],
    ),
    Stage(
        "text_tokenizer",
        outputs=lambda w: [_text_model(w)],
        commands=lambda w: [_py("unif2ace_jax.data", "train_tokenizer", "--dataset=synthface",
                                f"--config_name={FLAGS.data_config}", f"--data_dir={_data_dir(w)}",
                                f"--vocab_size={FLAGS.text_vocab_size}", f"--out={_text_model(w)}")],
    ),
    Stage(
        "judge",
        outputs=lambda w: [os.path.join(w, "judge_test.json")],
        commands=lambda w: [
            _py("unif2ace_jax.train.judge", "--config=configs/judge_synthface.py",
                f"--workdir={os.path.join(w, 'judge')}"),
            _py("unif2ace_jax.evaluate.judge", f"--workdir={os.path.join(w, 'judge')}",
                "--split=test", f"> {os.path.join(w, 'judge_test.json')}"),
        ],
        summary=lambda w: {"judge_test": _json(os.path.join(w, "judge_test.json"))},
    ),
]


def _run(command: list[str], log_prefix: str) -> None:
    """Runs one stage command; a trailing `> FILE` argument sends its stdout to FILE too."""
    out_path = None
    if command and command[-1].startswith("> "):
        out_path = command[-1][2:]
        command = command[:-1]
    print(f"$ {shlex.join(command)}" + (f" > {out_path}" if out_path else ""), flush=True)
    if FLAGS.dry_run:
        return
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("JAX_PLATFORMS", "cpu")
    if out_path is None:
        proc = subprocess.run(command, env=env)
    else:
        proc = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
        sys.stdout.write(proc.stdout)
        if proc.returncode == 0:
            tmp = out_path + ".tmp"
            with open(tmp, "w") as f:
                f.write(proc.stdout)
            os.replace(tmp, out_path)
    if proc.returncode != 0:
        raise UserError(f"stage {log_prefix} failed (exit {proc.returncode}): {shlex.join(command)}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    workdir = FLAGS.workdir
    os.makedirs(workdir, exist_ok=True)
    names = [s.name for s in STAGES]
    wanted = names if FLAGS.stages == "all" else [s for s in FLAGS.stages.split(",") if s]
    force = {s for s in FLAGS.force.split(",") if s}
    for name in list(wanted) + sorted(force):
        if name not in names:
            raise UserError(f"unknown stage {name!r}; stages: {', '.join(names)}")
    summary: dict = {}
    start = time.time()
    for stage in STAGES:
        if stage.name not in wanted:
            continue
        done = all(os.path.exists(p) for p in stage.outputs(workdir))
        if done and stage.name not in force:
            print(f"== {stage.name}: done already ({', '.join(stage.outputs(workdir))}); skipping",
                  flush=True)
        else:
            print(f"== {stage.name}", flush=True)
            t0 = time.time()
            for command in stage.commands(workdir):
                _run(command, stage.name)
            print(f"== {stage.name}: finished in {time.time() - t0:.0f}s", flush=True)
        if not FLAGS.dry_run:
            summary.update(stage.summary(workdir))
    if not FLAGS.dry_run:
        summary["wall_seconds"] = round(time.time() - start, 1)
        path = os.path.join(workdir, "summary.json")
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(path + ".tmp", path)
        print(json.dumps(summary, indent=2))
        print(f"== all stages done in {summary['wall_seconds']:.0f}s; summary: {path}")


if __name__ == "__main__":
    run_cli(main)
