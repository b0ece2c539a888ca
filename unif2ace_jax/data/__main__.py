"""Data CLI: build datasets, train the SentencePiece model, inspect a prepared dataset.

    python -m unif2ace_jax.data build --dataset=synthface --config_name=small_64 --data_dir=DIR
    python -m unif2ace_jax.data build --dataset=synthface --image_size=64 --num_train=1000 \\
        --num_test=100 --num_heldout=100 --data_dir=DIR           # custom sizes
    python -m unif2ace_jax.data build --dataset=unif2ace_130k --manual_dir=COPY --data_dir=DIR
    python -m unif2ace_jax.data train_tokenizer --data_dir=DIR --dataset=synthface \\
        --vocab_size=512 --out=DIR/synthface_text.model
    python -m unif2ace_jax.data inspect --data_dir=DIR [--dataset=synthface] [--config_name=...]
    python -m unif2ace_jax.data export --data_dir=DIR --dataset=synthface --config_name=small_64 \
        --split=test --num=4 --out=FACES_DIR    # face_<i>.png + faces.json (caption, QA, truth)

Bad input (missing directory, unknown dataset or config, corrupt image, ...) prints one
`error: ...` line and exits with status 2; a failed build leaves no partial dataset.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import tensorflow_datasets as tfds
from absl import flags, logging
from PIL import Image

from unif2ace_jax.data import records
from unif2ace_jax.data.build import DATASET_BUILDERS, build_dataset, read_texts
from unif2ace_jax.data.text_tokenizer import SentencePieceTokenizer, train_sentencepiece
from unif2ace_jax.errors import UserError, run_cli

COMMANDS = ("build", "train_tokenizer", "inspect", "export")

flags.DEFINE_string("dataset", None, "Dataset name: synthface or unif2ace_130k.")
flags.DEFINE_string("config_name", None, "Builder config (e.g. tiny_64, small_64, res_256).")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_string("manual_dir", None, "unif2ace_130k: directory of the downloaded copy.")
flags.DEFINE_integer("image_size", None, "Custom synthface / unif2ace_130k image size.")
flags.DEFINE_integer("num_train", 320, "Custom synthface: train examples.")
flags.DEFINE_integer("num_test", 64, "Custom synthface: test examples.")
flags.DEFINE_integer("num_heldout", 64, "Custom synthface: test_heldout_combos examples.")
flags.DEFINE_integer("seed", 0, "Custom synthface: generator seed.")
flags.DEFINE_integer("num_workers", 1, "synthface: processes rendering faces.")
flags.DEFINE_bool("skip_corrupt", False, "unif2ace_130k: skip (and count) corrupt images.")
flags.DEFINE_float("test_fraction", 0.01, "unif2ace_130k: test share when the copy has no test split.")
flags.DEFINE_integer("vocab_size", 512, "train_tokenizer: SentencePiece vocabulary size.")
flags.DEFINE_string("out", None, "train_tokenizer: output .model file; export: output directory.")
flags.DEFINE_integer("num", 4, "export: number of records (from the start of --split).")
flags.DEFINE_enum("model_type", "bpe", ["unigram", "bpe"],
                  "train_tokenizer: model type (bpe reaches larger vocabularies on SynthFace).")
flags.DEFINE_string("split", "train", "train_tokenizer / inspect / export: split to read.")

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset_info load at INFO
    args = argv[1:]
    if len(args) != 1 or args[0] not in COMMANDS:
        raise UserError(f"expected one command, one of {', '.join(COMMANDS)}; got {args or 'none'}")
    {"build": _build, "train_tokenizer": _train_tokenizer, "inspect": _inspect,
     "export": _export}[args[0]]()


def _require(name: str) -> str:
    value = getattr(FLAGS, name)
    if not value:
        raise UserError(f"--{name} is required")
    return value


def _build() -> None:
    dataset = _require("dataset")
    DATASET_BUILDERS.get(dataset)  # unknown name -> error listing the known ones
    data_dir = _require("data_dir")
    if dataset == "synthface":
        options = dict(
            config_name=FLAGS.config_name, image_size=FLAGS.image_size or 64,
            num_train=FLAGS.num_train, num_test=FLAGS.num_test, num_heldout=FLAGS.num_heldout,
            seed=FLAGS.seed, num_workers=FLAGS.num_workers,
        )
        if FLAGS.manual_dir:
            raise UserError("--manual_dir does not apply to synthface")
    else:
        options = dict(
            config_name=FLAGS.config_name, manual_dir=FLAGS.manual_dir, image_size=FLAGS.image_size,
            skip_corrupt=FLAGS.skip_corrupt, test_fraction=FLAGS.test_fraction,
        )
    path = build_dataset(dataset, data_dir, **options)
    print(f"built {path}")
    _print_summary(path)


def _print_summary(path: str) -> None:
    info = tfds.builder_from_directory(path).info
    for name, split in info.splits.items():
        print(f"  {name}: {split.num_examples} examples")


def _train_tokenizer() -> None:
    data_dir = _require("data_dir")
    out = _require("out")
    dataset = FLAGS.dataset or "synthface"
    texts = read_texts(data_dir, dataset, FLAGS.config_name, FLAGS.split)
    train_sentencepiece(texts, FLAGS.vocab_size, out, model_type=FLAGS.model_type)
    tok = SentencePieceTokenizer(out)
    print(f"wrote {out}: {tok.vocab_size} pieces ({FLAGS.model_type})")


def _inspect() -> None:
    data_dir = _require("data_dir")
    if not os.path.isdir(data_dir):
        raise UserError(f"data directory does not exist: {data_dir}")
    if not FLAGS.dataset:
        found = records.list_datasets(data_dir)
        print(f"datasets in {data_dir}: {', '.join(found) or '(none)'}")
        return
    builder = records.load_builder(data_dir, FLAGS.dataset, FLAGS.config_name)
    info = builder.info
    print(f"{info.full_name} at {builder.data_dir}")
    for name, split in info.splits.items():
        print(f"  {name}: {split.num_examples} examples")
    split = FLAGS.split if FLAGS.split in info.splits else next(iter(info.splits))
    source = records.encoded_source(builder, split)
    if not len(source):
        return
    rec = source[0]
    print(f"example 0 of {split}:")
    for key in sorted(rec):
        value = rec[key]
        if key == records.IMAGE:
            img = records.decode_image(bytes(value), source=f"{split} record 0")
            print(f"  image: uint8 {list(img.shape)} (PNG, {len(value)} bytes)")
        elif key == records.QA:
            rows = records.qa_rows(value)
            print(f"  qa: {len(rows)} pairs")
            for row in rows[:10]:
                print(f"    [{row.get('type', '')}] {row['question']} -> {row['answer']}")
        elif key == records.ATTRIBUTES:
            print(f"  attributes: {json.loads(records.as_str(value))}")
        elif isinstance(value, (bytes, str)):
            print(f"  {key}: {records.as_str(value)}")
        else:
            arr = np.asarray(value)
            print(f"  {key}: {arr.dtype} {list(arr.shape)} {np.array2string(arr.ravel()[:8])}")


def _export() -> None:
    """Writes the first `--num` records of `--split` as ``face_<i>.png`` plus ``faces.json``
    (per face: file, caption, attributes, QA pairs), e.g. to try `ask` on faces with known
    answers. The directory is filled through a temporary sibling and renamed at the end."""
    data_dir = _require("data_dir")
    out = _require("out")
    if not os.path.isdir(data_dir):
        raise UserError(f"data directory does not exist: {data_dir}")
    if FLAGS.num < 1:
        raise UserError(f"--num must be >= 1, got {FLAGS.num}")
    builder = records.load_builder(data_dir, FLAGS.dataset or "synthface", FLAGS.config_name)
    if FLAGS.split not in builder.info.splits:
        raise UserError(f"split {FLAGS.split!r} not in {builder.info.full_name}; splits: "
                        f"{', '.join(builder.info.splits)}")
    source = records.encoded_source(builder, FLAGS.split)
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    faces = []
    for i in range(min(FLAGS.num, len(source))):
        rec = source[i]
        name = f"face_{i}.png"
        image = records.decode_image(bytes(rec[records.IMAGE]), source=f"{FLAGS.split} record {i}")
        Image.fromarray(image).save(os.path.join(tmp, name))
        faces.append({"file": name, "caption": records.as_str(rec[records.CAPTION]),
                      "attributes": json.loads(records.as_str(rec[records.ATTRIBUTES])),
                      "qa": records.qa_rows(rec[records.QA])})
    with open(os.path.join(tmp, "faces.json"), "w") as f:
        json.dump(faces, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"wrote {len(faces)} faces of {builder.info.full_name}/{FLAGS.split} to {out}")


if __name__ == "__main__":
    run_cli(main)
