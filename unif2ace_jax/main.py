"""The main job on the embedded default: data -> judge -> image tokenizer -> expert encoders
-> unified model -> samples, answers and evaluation.

    python -m unif2ace_jax.main --workdir=runs/default

Each stage is one of the project's own CLIs, printed before it runs, so every step can be
repeated by hand. A stage whose output already exists is skipped (the job resumes where an
interrupted run stopped; `--force=STAGE,...` reruns stages). Stages that do not read each other's
outputs run side by side (`--jobs`, default 3: the judge, the image tokenizer and the expert
encoders train together; `--jobs=1` runs them one after another); if one fails, the others are
stopped. Outputs under `--workdir`:

    data/                 SynthFace TFDS records (array_record) and the SentencePiece model
    judge/                the SynthFace attribute judge; judge_test.json its test accuracy
    tokenizer/            the LFQ image tokenizer (train_summary.json once trained);
                          tokenizer_eval.json (PSNR, code usage, judge on reconstructions)
    data/synthface_codes  the records with image codes added (pre-tokenised)
    encoders/face, encoders/clip   the seq-MoE's frozen face and CLIP-style encoders
    data/synthface_codes_emb_<kinds>   the records with codes and those encoders' embeddings
                          (these two only for the features the unified config's seq-MoE reads:
                          `data.extra_fields`, e.g. synthface_codes_emb_face)
    unified/              the unified model (checkpoints, metrics.jsonl, run.json)
    samples.png           faces generated for a few fine-grained prompts (one row per prompt)
    ask_faces/, answers.json  test faces, questions about them, the answers and the truth
    eval_test.json, eval_test_heldout_combos.json   VQA accuracy, generation accuracy, NELBO
    summary.json          the figures of every stage
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from typing import Callable

from absl import flags

from unif2ace_jax import cli
from unif2ace_jax.errors import UserError, run_cli
from unif2ace_jax.stage_graph import run_graph
from unif2ace_jax.utils.files import write_atomically, write_json

flags.DEFINE_string("workdir", "runs/default", "Where every stage writes its outputs.")
flags.DEFINE_string("stages", "all", "Comma-separated stages to run (default: all, in order).")
flags.DEFINE_string("force", "", "Comma-separated stages to rerun even if their output exists.")
flags.DEFINE_string("data_config", "small_64", "SynthFace builder config for the main job.")
flags.DEFINE_integer("text_vocab_size", 512, "SentencePiece vocabulary size.")
flags.DEFINE_bool("dry_run", False, "Print the commands without running them (in order).")
flags.DEFINE_integer("jobs", 3, "Stages run at once, each as soon as the stages whose outputs it "
                     "reads have finished (1: one after another, in order).")
flags.DEFINE_string("unified_config", "configs/synthface_tiny.py:moe=seq",
                    "Config of the unified model (default: the sequence-level MoE with its frozen "
                    "clip/face experts; ':moe=both' adds the token-level MoE, the paper's full "
                    "model). Only the encoders whose features the config reads are trained "
                    "(':moe=seq,drop=clip' trains the face encoder alone); with none the encoders "
                    "stages are skipped.")
flags.DEFINE_multi_string("unified_override", [],
                          "Extra unified-model config overrides, e.g. total_steps=600 (repeatable).")
flags.DEFINE_integer("eval_generate", 1000, "evaluate: faces generated from test captions "
                     "(1000 = all of SynthFace test).")
flags.DEFINE_integer("eval_generate_heldout", 300,
                     "evaluate: faces generated from test_heldout_combos captions.")
flags.DEFINE_integer("eval_questions", 2000, "evaluate: questions answered per split.")
flags.DEFINE_bool("collect_answers", False, "Internal: print the ask stage's answers as JSON.")
flags.DEFINE_bool("last_metrics", False, "Internal: print the last record of WORKDIR/metrics.jsonl.")
FLAGS = flags.FLAGS


def _eval_faces(split: str) -> int:
    """Faces the evaluate stage generates for `split` (all of test by default)."""
    return FLAGS.eval_generate if split == "test" else FLAGS.eval_generate_heldout


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    outputs: Callable[[str], list[str]]  # paths that exist once the stage has finished
    commands: Callable[[str], list[list[str]]]
    summary: Callable[[str], dict] = lambda workdir: {}
    needed: Callable[[], bool] = lambda: True  # False: the job skips it
    after: tuple[str, ...] = ()  # the stages whose outputs it reads


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        text = f.read().strip()
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # Progress lines before a one-line JSON object: the object is the last line.
        return json.loads(text.splitlines()[-1])


def _data_dir(w: str) -> str:
    return os.path.join(w, "data")


def _text_model(w: str) -> str:
    return os.path.join(_data_dir(w), "synthface_text.model")


def _tok_dir(w: str) -> str:
    return os.path.join(w, "tokenizer")


def _unified_dir(w: str) -> str:
    return os.path.join(w, "unified")


def _encoder_dir(w: str, kind: str) -> str:
    return os.path.join(w, "encoders", kind)


def _faces_dir(w: str) -> str:
    return os.path.join(w, "ask_faces")


CODED_DATASET = "synthface_codes"  # + image codes
EMBEDDED_DATASET = "synthface_codes_emb"  # + the expert encoders' embeddings: "<this>_<kinds>"
ENCODER_KINDS = ("face", "clip")  # the feature fields the job can compute (encoders stage)
EVAL_SPLITS = ("test", "test_heldout_combos")
# In SynthFace's vocabulary (data/synthface/attributes.py), phrased like its captions.
SAMPLE_PROMPTS = (
    "This person has red hair and green eyes. They wear a beanie and circular glasses.",
    "The person has short black hair, blue eyes, a full beard and is smiling. "
    "The background is yellow.",
    "They are shown with long blond hair, violet eyes, crimson lipstick and hoops. "
    "The background is pink.",
    "The person has gray curly hair, a handlebar moustache and no glasses. "
    "The background is teal.",
)
ASK_QUESTIONS = (
    "What color is the person's hair?",
    "How is the person's hair styled?",
    "What color are the person's eyes?",
    "What kind of glasses is the person wearing?",
    "What color is the background?",
)
NUM_ASK_FACES = 3


@functools.lru_cache(maxsize=None)
def unified_feature_fields(config_spec: str) -> tuple[str, ...]:
    """The expert-encoder features the unified config ``path[:arg]`` reads (its
    ``data.extra_fields``, e.g. ``("face",)``): the encoders the job must train and embed."""
    path, _, arg = config_spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"--unified_config: no config file {path!r}")
    try:
        config = cli.load_config(path, arg)
    except ValueError as e:
        raise UserError(f"--unified_config={config_spec}: {e}") from None
    fields = tuple(config.data.extra_fields)
    unknown = [f for f in fields if f not in ENCODER_KINDS]
    if unknown:
        raise UserError(f"--unified_config={config_spec} reads features {unknown} that the main "
                        f"job cannot compute; it trains the encoders {', '.join(ENCODER_KINDS)}")
    return fields


def _encoder_kinds() -> tuple[str, ...]:
    fields = unified_feature_fields(FLAGS.unified_config)
    return tuple(k for k in ENCODER_KINDS if k in fields)


def _needs_features() -> bool:
    return bool(_encoder_kinds())


def _embedded_dataset() -> str:
    """The dataset with the codes and the embeddings of exactly the encoders the model reads
    (so a workdir can serve models that read different features)."""
    return "_".join((EMBEDDED_DATASET, *_encoder_kinds()))


def _unified_overrides(w: str) -> list[str]:
    dataset = _embedded_dataset() if _needs_features() else CODED_DATASET
    return [f"--config.data.data_dir={_data_dir(w)}", f"--config.data.dataset={dataset}",
            f"--config.data.config_name={FLAGS.data_config}",
            f"--config.data.tokenizer.model_path={_text_model(w)}",
            f"--config.tokenizer_workdir={_tok_dir(w)}",
            f"--config.judge_workdir={os.path.join(w, 'judge')}",
            *[f"--config.{o}" for o in FLAGS.unified_override]]


def _brief_eval(result: dict) -> dict:
    keys = ("vqa_accuracy", "vqa_accuracy_per_type", "gen_attribute_accuracy",
            "gen_attribute_accuracy_mean", "real_attribute_accuracy", "nelbo_bits_per_token",
            "num_questions", "num_generated")
    return {k: result[k] for k in keys if k in result}


def collect_answers(w: str) -> dict:
    """The `ask` stage's answers next to the true ones, from ``ask_faces/``."""
    with open(os.path.join(_faces_dir(w), "faces.json")) as f:
        faces = json.load(f)
    rows = []
    for i, face in enumerate(faces):
        path = os.path.join(_faces_dir(w), f"answers_{i}.txt")
        with open(path) as f:
            lines = [line.strip() for line in f if " -> " in line]
        for line in lines:
            question, _, answer = line.partition(" -> ")
            rows.append({"face": face["file"], "question": question, "answer": answer})
    return {"faces": [f["file"] for f in faces], "attributes": [f["attributes"] for f in faces],
            "answers": rows}


def _judge_dir(w: str) -> str:
    return os.path.join(w, "judge")


def _in(w: str, name: str) -> str:
    """A stage output file directly under the workdir."""
    return os.path.join(w, name)


# One function per stage: the commands it runs (a trailing "> FILE" saves the command's stdout).

def _data_commands(w: str) -> list[list[str]]:
    return [_py("unif2ace_jax.data", "build", "--dataset=synthface",
                f"--config_name={FLAGS.data_config}", f"--data_dir={_data_dir(w)}",
                f"--num_workers={min(os.cpu_count() or 1, 8)}")]


def _text_tokenizer_commands(w: str) -> list[list[str]]:
    return [_py("unif2ace_jax.data", "train_tokenizer", "--dataset=synthface",
                f"--config_name={FLAGS.data_config}", f"--data_dir={_data_dir(w)}",
                f"--vocab_size={FLAGS.text_vocab_size}", f"--out={_text_model(w)}")]


def _judge_commands(w: str) -> list[list[str]]:
    return [_py("unif2ace_jax.train.judge", "--config=configs/judge_synthface.py",
                f"--workdir={_judge_dir(w)}"),
            _py("unif2ace_jax.evaluate.judge", f"--workdir={_judge_dir(w)}", "--split=test",
                f"> {_in(w, 'judge_test.json')}")]


def _tokenizer_commands(w: str) -> list[list[str]]:
    # The tokenizer_eval stage measures the same test faces (and adds the judge).
    return [_py("unif2ace_jax.train.tokenizer", "--config=configs/tokenizer_synthface_64.py",
                f"--workdir={_tok_dir(w)}", "--config.train.eval_examples=0")]


def _tokenizer_eval_commands(w: str) -> list[list[str]]:
    return [_py("unif2ace_jax.evaluate.tokenizer", f"--workdir={_tok_dir(w)}", "--split=test",
                f"--judge_workdir={_judge_dir(w)}", f"> {_in(w, 'tokenizer_eval.json')}")]


def _pretokenize_commands(w: str) -> list[list[str]]:
    return [_py("unif2ace_jax.data.pretokenize", f"--tokenizer_workdir={_tok_dir(w)}",
                f"--data_dir={_data_dir(w)}", f"--dataset=synthface/{FLAGS.data_config}",
                f"--out_data_dir={_data_dir(w)}", f"--name={CODED_DATASET}")]


def _encoders_commands(w: str) -> list[list[str]]:
    return [_py("unif2ace_jax.train.encoders", f"--kind={k}", f"--workdir={_encoder_dir(w, k)}",
                f"--config.data.data_dir={_data_dir(w)}",
                f"--config.data.config={FLAGS.data_config}",
                f"--config.data.tokenizer.model_path={_text_model(w)}")
            for k in _encoder_kinds()]


def _embeddings_commands(w: str) -> list[list[str]]:
    return [_py("unif2ace_jax.data.embeddings", f"--data_dir={_data_dir(w)}",
                f"--dataset={CODED_DATASET}/{FLAGS.data_config}",
                "--encoders=" + ",".join(f"synthface_{k}" for k in _encoder_kinds()),
                "--encoder_workdirs=" + ",".join(_encoder_dir(w, k) for k in _encoder_kinds()),
                f"--out_data_dir={_data_dir(w)}", f"--name={_embedded_dataset()}")]


def _unified_commands(w: str) -> list[list[str]]:
    return [_py("unif2ace_jax.train", f"--config={FLAGS.unified_config}",
                f"--workdir={_unified_dir(w)}", *_unified_overrides(w)),
            _py("unif2ace_jax.main", "--last_metrics", f"--workdir={_unified_dir(w)}",
                f"> {_in(w, 'unified_train.json')}")]


def _generate_commands(w: str) -> list[list[str]]:
    return [_py("unif2ace_jax.generate", f"--workdir={_unified_dir(w)}",
                *[f"--prompt={p}" for p in SAMPLE_PROMPTS], "--num=6",
                f"--out={_in(w, 'samples.png')}")]


def _ask_commands(w: str) -> list[list[str]]:
    """Exports test faces, asks each the ASK_QUESTIONS, collects the answers."""
    export = _py("unif2ace_jax.data", "export", f"--data_dir={_data_dir(w)}",
                 "--dataset=synthface", f"--config_name={FLAGS.data_config}", "--split=test",
                 f"--num={NUM_ASK_FACES}", f"--out={_faces_dir(w)}")
    asks = [_py("unif2ace_jax.ask", f"--workdir={_unified_dir(w)}",
                f"--image={os.path.join(_faces_dir(w), f'face_{i}.png')}",
                *[f"--question={q}" for q in ASK_QUESTIONS],
                f"> {os.path.join(_faces_dir(w), f'answers_{i}.txt')}")
            for i in range(NUM_ASK_FACES)]
    collect = _py("unif2ace_jax.main", "--collect_answers", f"--workdir={w}",
                  f"> {_in(w, 'answers.json')}")
    return [export, *asks, collect]


def _evaluate_commands(w: str) -> list[list[str]]:
    return [_py("unif2ace_jax.evaluate", f"--workdir={_unified_dir(w)}", f"--split={s}",
                f"--judge_workdir={_judge_dir(w)}", f"--num_generate={_eval_faces(s)}",
                f"--max_questions={FLAGS.eval_questions}", f"> {_in(w, f'eval_{s}.json')}")
            for s in EVAL_SPLITS]


def _json_summary(key: str, name: str) -> Callable[[str], dict]:
    """A stage summary: ``{key: the JSON object in WORKDIR/name}``."""
    return lambda w: {key: _json(_in(w, name))}


STAGES: list[Stage] = [
    Stage("data", outputs=lambda w: [os.path.join(_data_dir(w), "synthface", FLAGS.data_config)],
          commands=_data_commands),
    Stage("text_tokenizer", outputs=lambda w: [_text_model(w)],
          commands=_text_tokenizer_commands, after=("data",)),
    Stage("judge", outputs=lambda w: [_in(w, "judge_test.json")], commands=_judge_commands,
          summary=_json_summary("judge_test", "judge_test.json"), after=("data",)),
    Stage("tokenizer",
          outputs=lambda w: [os.path.join(_tok_dir(w), "train_summary.json")],  # written last
          commands=_tokenizer_commands, after=("data",)),
    Stage("tokenizer_eval", outputs=lambda w: [_in(w, "tokenizer_eval.json")],
          commands=_tokenizer_eval_commands,
          summary=_json_summary("tokenizer_test", "tokenizer_eval.json"),
          after=("tokenizer", "judge")),
    Stage("pretokenize",
          outputs=lambda w: [os.path.join(_data_dir(w), CODED_DATASET, FLAGS.data_config)],
          commands=_pretokenize_commands, after=("tokenizer",)),
    Stage("encoders",
          outputs=lambda w: [os.path.join(_encoder_dir(w, k), "eval.json")
                             for k in _encoder_kinds()],
          commands=_encoders_commands,
          summary=lambda w: {f"encoder_{k}": _json(os.path.join(_encoder_dir(w, k), "eval.json"))
                             for k in _encoder_kinds()},
          needed=_needs_features, after=("data", "text_tokenizer")),
    Stage("embeddings",
          outputs=lambda w: [os.path.join(_data_dir(w), _embedded_dataset(), FLAGS.data_config)],
          commands=_embeddings_commands, needed=_needs_features,
          after=("pretokenize", "encoders")),
    Stage("unified", outputs=lambda w: [_in(w, "unified_train.json")],
          commands=_unified_commands,
          summary=_json_summary("unified_train", "unified_train.json"),
          after=("text_tokenizer", "judge", "tokenizer", "pretokenize", "embeddings")),
    Stage("generate", outputs=lambda w: [_in(w, "samples.png")], commands=_generate_commands,
          summary=lambda w: {"samples": _in(w, "samples.png"),
                             "sample_prompts": list(SAMPLE_PROMPTS)},
          after=("unified",)),
    Stage("ask", outputs=lambda w: [_in(w, "answers.json")], commands=_ask_commands,
          summary=_json_summary("answers", "answers.json"), after=("data", "unified")),
    Stage("evaluate", outputs=lambda w: [_in(w, f"eval_{s}.json") for s in EVAL_SPLITS],
          commands=_evaluate_commands,
          summary=lambda w: {f"eval_{s}": _brief_eval(_json(_in(w, f"eval_{s}.json")))
                             for s in EVAL_SPLITS},
          after=("judge", "unified")),
]


class _Stopped(Exception):
    """A stage stopped because another one failed (not an error of its own)."""


_children: set[subprocess.Popen] = set()
_lock = threading.Lock()  # guards _children and whole-line writes to stdout


def _stop_children() -> None:
    with _lock:
        for proc in _children:
            if proc.poll() is None:
                proc.terminate()


def _say(line: str) -> None:
    """One whole line to stdout (stages run on several threads; `print` may split a line)."""
    with _lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _run(command: list[str], stage: str, abort: threading.Event) -> None:
    """Runs one stage command; a trailing `> FILE` argument sends its stdout to FILE too
    (written whole, only on success)."""
    out_path = None
    if command and command[-1].startswith("> "):
        out_path = command[-1][2:]
        command = command[:-1]
    _say(f"$ {shlex.join(command)}" + (f" > {out_path}" if out_path else ""))
    if FLAGS.dry_run:
        return
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("JAX_PLATFORMS", "cpu")
    with _lock:
        if abort.is_set():
            raise _Stopped(stage)
        proc = subprocess.Popen(command, env=env,
                                stdout=None if out_path is None else subprocess.PIPE, text=True)
        _children.add(proc)
    try:
        stdout, _ = proc.communicate()
    finally:
        with _lock:
            _children.discard(proc)
    if proc.returncode != 0:
        if abort.is_set():
            raise _Stopped(stage)
        raise UserError(f"stage {stage} failed (exit {proc.returncode}): {shlex.join(command)}")
    if out_path is not None:
        with _lock:
            sys.stdout.write(stdout)
            sys.stdout.flush()
        write_atomically(out_path, stdout)


def _run_stage(stage: Stage, workdir: str, force: bool, abort: threading.Event) -> None:
    if not stage.needed():
        _say(f"== {stage.name}: not needed (the unified config reads no expert features)")
        return
    outputs = stage.outputs(workdir)
    if all(os.path.exists(p) for p in outputs) and not force:
        _say(f"== {stage.name}: done already ({', '.join(outputs)}); skipping")
        return
    _say(f"== {stage.name}")
    t0 = time.time()
    for command in stage.commands(workdir):
        _run(command, stage.name, abort)
    _say(f"== {stage.name}: finished in {time.time() - t0:.0f}s")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    workdir = FLAGS.workdir
    if FLAGS.collect_answers:
        print(json.dumps(collect_answers(workdir)))
        return
    if FLAGS.last_metrics:
        # Imported here: it loads jax (seconds), which the stage runner itself never needs.
        from unif2ace_jax.train.progress import read_metrics

        records = read_metrics(workdir)
        if not records:
            raise UserError(f"no metrics in {workdir}")
        print(json.dumps(records[-1]))
        return
    os.makedirs(workdir, exist_ok=True)
    names = [s.name for s in STAGES]
    wanted = names if FLAGS.stages == "all" else [s for s in FLAGS.stages.split(",") if s]
    force = {s for s in FLAGS.force.split(",") if s}
    for name in list(wanted) + sorted(force):
        if name not in names:
            raise UserError(f"unknown stage {name!r}; stages: {', '.join(names)}")
    _needs_features()  # a bad --unified_config fails here, before any stage runs
    if FLAGS.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {FLAGS.jobs}")
    by_name = {s.name: s for s in STAGES}
    start = time.time()
    run_graph([n for n in names if n in wanted], {s.name: s.after for s in STAGES},
              lambda name, abort: _run_stage(by_name[name], workdir, name in force, abort),
              jobs=1 if FLAGS.dry_run else FLAGS.jobs, on_abort=_stop_children)
    if not FLAGS.dry_run:
        summary: dict = {}
        for stage in STAGES:
            if stage.name in wanted and stage.needed():
                summary.update(stage.summary(workdir))
        summary["wall_seconds"] = round(time.time() - start, 1)
        path = os.path.join(workdir, "summary.json")
        write_json(path, summary, indent=2)
        print(json.dumps(summary, indent=2))
        print(f"== all stages done in {summary['wall_seconds']:.0f}s; summary: {path}")


if __name__ == "__main__":
    run_cli(main)
