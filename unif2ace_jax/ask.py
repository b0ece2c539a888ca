"""Visual question answering with a trained unified model; prints the answer.

    python -m unif2ace_jax.ask --workdir=DIR --image=face.png --question="What color is the hair?"

The image is center-cropped and resized to the image tokenizer's resolution, encoded to codes,
and the answer is decoded greedily with a KV cache (for a ``convert.showo`` workdir: Show-o's
``'USER: \\n' + question + ' ASSISTANT:'`` prompt and mask, greedy over the whole vocabulary). A model with a sequence-level MoE gets its
image features (clip, face) computed on the fly by the frozen encoders the run names
(`checkpoint.trained.feature_encoder_specs`). ``--question`` may be repeated (one answer
line each). Bad input (missing workdir or checkpoint, unreadable image, empty question) prints
one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import os

import numpy as np
from absl import flags

from unif2ace_jax.checkpoint.trained import load_trained
from unif2ace_jax.cli import begin
from unif2ace_jax.data import pipeline
from unif2ace_jax.data.records import decode_image
from unif2ace_jax.errors import UserError, run_cli
from unif2ace_jax.sampling.vqa import answer_questions

flags.DEFINE_string("workdir", None, "Training directory of the unified model.")
flags.DEFINE_string("image", None, "Image file (PNG, JPEG, ...).")
flags.DEFINE_multi_string("question", None, "Question about the image; repeat for several.")
flags.DEFINE_integer("max_tokens", None,
                     "Most answer tokens (default: config.sampling.max_answer_tokens).")

FLAGS = flags.FLAGS


def read_image(path: str, size: int | None = None):
    """uint8 [H, W, 3] from an image file (center-cropped and resized to [size, size] when
    `size` is given); UserError when missing or unreadable."""
    if not os.path.isfile(path):
        raise UserError(f"image file does not exist: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e.strerror}") from None
    return decode_image(data, source=path, size=size)


def main(argv: list[str]) -> None:
    begin(argv, "workdir", "image")
    questions = [q for q in (FLAGS.question or []) if q.strip()]
    if not questions:
        raise UserError("--question is required (non-empty)")
    if FLAGS.max_tokens is not None and FLAGS.max_tokens < 1:
        raise UserError(f"--max_tokens must be >= 1, got {FLAGS.max_tokens}")

    read_image(FLAGS.image)  # fail on a bad image before loading the model

    answers = ask(load_trained(FLAGS.workdir), FLAGS.image, questions,
                  max_new_tokens=FLAGS.max_tokens)
    for question, answer in zip(questions, answers):
        print(answer if len(questions) == 1 else f"{question} -> {answer}")


def image_inputs(trained, path: str) -> tuple:
    """``(codes [1, N] int32, features {key: [1, ...]})`` of an image file for the model.

    The codes come from the run's image tokenizer. A seq-MoE's image features (clip, face) are
    computed on the fly by the run's frozen encoders (`Trained.image_features`), on the image
    center-cropped and resized to the records' size (``data.image_size``), as the records'
    precomputed fields were; ``<key>_present`` is True. No features for other models.
    """
    image_tokenizer = trained.image_tokenizer
    image = read_image(path, image_tokenizer.image_size)
    codes = np.asarray(image_tokenizer.encode(image[None])).reshape(1, -1)
    features = {}
    if trained.feature_encoders:
        size = int(pipeline.full_config(trained.config.data).image_size or 0) or None
        features = dict(trained.image_features(read_image(path, size)[None]))
        features.update({f"{k}_present": np.ones((1,), bool) for k in list(features)})
    return codes, features


def ask(trained, image_path: str, questions: list[str], *,
        max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers to `questions` about one image file; `trained` is a
    `checkpoint.trained.Trained`."""
    codes, features = image_inputs(trained, image_path)
    n = len(questions)
    return answer_questions(trained, np.repeat(codes, n, axis=0), questions,
                            max_new_tokens=max_new_tokens,
                            features={k: np.repeat(v, n, axis=0) for k, v in features.items()})


if __name__ == "__main__":
    run_cli(main)
