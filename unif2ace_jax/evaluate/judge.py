"""The SynthFace attribute judge as an API and a CLI: how many attributes do faces really show?

API::

    judge = load_judge(workdir)                  # trained by unif2ace_jax.train.judge
    judge.predict(images)                        # {name: [value per image]}
    judge.score(images, attributes)              # {name: accuracy, ..., "mean": ...}

`attributes` is one dict per image, name -> value the image should show; dicts may be partial
(e.g. only the attributes a caption mentions): an attribute is scored only on the images whose
dict names it.

CLI (prints one JSON object)::

    python -m unif2ace_jax.evaluate.judge --workdir=DIR --split=test [--num=1000]
    python -m unif2ace_jax.evaluate.judge --workdir=DIR --split=test --data_dir=TFDS_DIR
    python -m unif2ace_jax.evaluate.judge --workdir=DIR --images=FILE.npz|PNG_DIR \\
        --attributes=FILE.json
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging
from flax import serialization

from unif2ace_jax.data import images as images_lib
from unif2ace_jax.data.records import decode_image
from unif2ace_jax.data.synthface.attributes import ATTRIBUTES
from unif2ace_jax.errors import UserError
from unif2ace_jax.models.judge import AttributeJudge, make_judge
from unif2ace_jax.utils.files import read_json, write_atomically

PARAMS_FILE = "judge_params.msgpack"
CONFIG_FILE = "judge_config.json"


# --------------------------------------------------------------------------- scoring (pure numpy)


class AccuracyTally:
    """Running per-attribute accuracy over batches of (predicted, target) labels."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.correct = np.zeros(len(self.names), np.int64)
        self.total = np.zeros(len(self.names), np.int64)
        self.num_images = 0

    def add(self, predicted: np.ndarray, targets: np.ndarray) -> None:
        """predicted, targets: int [N, A]; targets -1 are not scored."""
        predicted, targets = np.asarray(predicted), np.asarray(targets)
        if predicted.shape != targets.shape or predicted.ndim != 2 \
                or predicted.shape[1] != len(self.names):
            raise ValueError(f"predicted {predicted.shape} and targets {targets.shape} must both "
                             f"be [N, {len(self.names)}]")
        scored = targets >= 0
        self.correct += ((predicted == targets) & scored).sum(0)
        self.total += scored.sum(0)
        self.num_images += predicted.shape[0]

    def result(self) -> dict[str, float | int]:
        """{name: accuracy} for every attribute scored at least once, plus
        `mean` (mean of those accuracies), `micro` (fraction of all scored (image, attribute)
        pairs that are right), `num_images` and `num_scored` (pairs)."""
        out: dict[str, float | int] = {}
        for name, c, t in zip(self.names, self.correct, self.total):
            if t:
                out[name] = float(c / t)
        accuracies = [out[n] for n in self.names if n in out]
        out["mean"] = float(np.mean(accuracies)) if accuracies else float("nan")
        total = int(self.total.sum())
        out["micro"] = float(self.correct.sum() / total) if total else float("nan")
        out["num_images"] = int(self.num_images)
        out["num_scored"] = total
        return out


def score_labels(predicted: np.ndarray, targets: np.ndarray,
                 names: Sequence[str] | None = None) -> dict[str, float | int]:
    """Per-attribute accuracy of predicted [N, A] against targets [N, A] (-1 = not scored)."""
    tally = AccuracyTally(names or images_lib.attribute_names())
    tally.add(predicted, targets)
    return tally.result()


def targets_from_attributes(attributes: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """targets int32 [N, A] from one (possibly partial) dict per image; -1 where not named.

    Raises UserError for an unknown attribute name or value.
    """
    table = dict(zip(images_lib.attribute_names(), _values()))
    for i, attrs in enumerate(attributes):
        if not isinstance(attrs, Mapping):
            raise UserError(f"attributes[{i}] must be a dict name -> value, "
                            f"got {type(attrs).__name__}")
        for name, value in attrs.items():
            if name not in table:
                raise UserError(f"attributes[{i}]: unknown attribute {name!r}; "
                                f"known: {list(table)}")
            if value not in table[name]:
                raise UserError(f"attributes[{i}]: unknown value {value!r} for {name}; "
                                f"known: {list(table[name])}")
    return np.stack([images_lib.attribute_labels(a) for a in attributes]) if attributes \
        else np.zeros((0, len(table)), np.int32)


def _values() -> tuple[tuple[str, ...], ...]:
    return tuple(ATTRIBUTES.values())


# --------------------------------------------------------------------------- the judge


class Judge:
    """A trained judge: predicts every SynthFace attribute of uint8 [N, H, W, 3] images."""

    def __init__(self, model: AttributeJudge, params: Any, *, batch_size: int = 256):
        self.model = model
        self.params = jax.device_put(params)
        self.batch_size = batch_size
        self.names = images_lib.attribute_names()
        self.values = _values()
        self._apply = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x), axis=-1))

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        """images uint8 [N, H, W, 3] (any H = W; resized to the judge's resolution)
        -> value indices int32 [N, A], attributes in `attribute_names()` order."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise UserError(f"judge expects uint8 images [N, H, W, 3], got "
                            f"{images.dtype} {list(images.shape)}")
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start:start + self.batch_size]
            n = chunk.shape[0]
            if n < self.batch_size and images.shape[0] > self.batch_size:
                chunk = np.concatenate(  # same shape as the other chunks: no re-compilation
                    [chunk, np.zeros((self.batch_size - n,) + chunk.shape[1:], np.uint8)])
            out.append(np.asarray(self._apply(self.params, chunk))[:n])
        if not out:
            return np.zeros((0, len(self.names)), np.int32)
        return np.concatenate(out).astype(np.int32)

    def predict(self, images: np.ndarray) -> dict[str, list[str]]:
        """images uint8 [N, H, W, 3] -> {attribute name: [predicted value of each image]}."""
        labels = self.predict_labels(images)
        return {name: [values[i] for i in labels[:, a]]
                for a, (name, values) in enumerate(zip(self.names, self.values))}

    def predict_attributes(self, images: np.ndarray) -> list[dict[str, str]]:
        """images uint8 [N, H, W, 3] -> one dict name -> predicted value per image."""
        return [images_lib.labels_to_attributes(row) for row in self.predict_labels(images)]

    def score(self, images: np.ndarray, attributes: Sequence[Mapping[str, str]]
              ) -> dict[str, float | int]:
        """Accuracy of the attributes each image should show (see `AccuracyTally.result`).

        images: uint8 [N, H, W, 3]; attributes: N dicts name -> value, possibly partial.
        """
        if len(attributes) != len(images):
            raise UserError(f"{len(images)} images but {len(attributes)} attribute dicts")
        targets = targets_from_attributes(attributes)
        return score_labels(self.predict_labels(images), targets, self.names)

    def score_batches(self, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, float | int]:
        """Accuracy over batches {"image": uint8 [B,H,W,3], "labels": int [B,A]} (-1 unscored)."""
        tally = AccuracyTally(self.names)
        for batch in batches:
            tally.add(self.predict_labels(batch["image"]), batch["labels"])
        return tally.result()


def save_judge(workdir: str, config: ml_collections.ConfigDict, params: Any) -> None:
    """Writes the trained judge (model config, attribute schema, params) into `workdir`."""
    meta = {"model": config.model.to_dict(), "data": config.data.to_dict(),
            "attributes": {k: list(v) for k, v in ATTRIBUTES.items()}}
    os.makedirs(workdir, exist_ok=True)
    params = jax.tree.map(np.asarray, params)
    write_atomically(os.path.join(workdir, PARAMS_FILE), serialization.msgpack_serialize(params))
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=1, default=list)


def load_meta(workdir: str) -> dict:
    """The saved judge's config (`model`, `data`, `attributes`); UserError if absent."""
    if not workdir or not os.path.isdir(workdir):
        raise UserError(f"judge workdir does not exist: {workdir!r}")
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(workdir, PARAMS_FILE)):
        raise UserError(f"no trained judge in {workdir} ({CONFIG_FILE} / {PARAMS_FILE} missing); "
                        f"train one with python -m unif2ace_jax.train.judge "
                        f"--config=configs/judge_synthface.py --workdir={workdir}")
    return read_json(path, "judge config")


def load_judge(workdir: str, *, batch_size: int = 256) -> Judge:
    """The judge trained into `workdir` by `unif2ace_jax.train.judge`."""
    meta = load_meta(workdir)
    if meta["attributes"] != {k: list(v) for k, v in ATTRIBUTES.items()}:
        raise UserError(f"the judge in {workdir} was trained on another SynthFace attribute "
                        f"schema; retrain it")
    model = make_judge(ml_collections.ConfigDict(meta["model"]), images_lib.num_values())
    with open(os.path.join(workdir, PARAMS_FILE), "rb") as f:
        try:
            params = serialization.msgpack_restore(f.read())
        except Exception as e:  # corrupt or truncated file
            raise UserError(f"cannot read {PARAMS_FILE} in {workdir}: {e}") from None
    return Judge(model, params, batch_size=batch_size)


# --------------------------------------------------------------------------- CLI


def _read_images(path: str) -> tuple[np.ndarray, list[str]]:
    """uint8 [N, H, W, 3] from an .npz (array `images`, or its only array) or a dir of PNGs."""
    if os.path.isdir(path):
        names = sorted(f for f in os.listdir(path) if f.lower().endswith((".png", ".jpg", ".jpeg")))
        if not names:
            raise UserError(f"no .png/.jpg images in {path}")
        images = []
        for name in names:
            with open(os.path.join(path, name), "rb") as f:
                images.append(decode_image(f.read(), source=os.path.join(path, name)))
        if len({im.shape for im in images}) > 1:
            raise UserError(f"images in {path} differ in size")
        return np.stack(images), names
    if not os.path.isfile(path):
        raise UserError(f"images not found: {path}")
    try:
        with np.load(path) as data:
            key = "images" if "images" in data else (
                data.files[0] if len(data.files) == 1 else None)
            if key is None:
                raise UserError(f"{path} has arrays {data.files}; expected one named 'images'")
            images = data[key]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return images, [str(i) for i in range(len(images))]


def _read_attributes(path: str, names: list[str]) -> list[dict]:
    data = read_json(path, "attributes file")
    if isinstance(data, dict):  # keyed by image file name
        missing = [n for n in names if n not in data]
        if missing:
            raise UserError(f"{path} has no attributes for {missing[:5]}")
        data = [data[n] for n in names]
    if not isinstance(data, list):
        raise UserError(f"{path} must hold a list of dicts (one per image) or a dict by file name")
    return data


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset load at INFO
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if not f.workdir:
        raise UserError("--workdir is required (the judge's training directory)")
    judge = load_judge(f.workdir, batch_size=f.batch_size)
    if f.images or f.attributes:
        if not (f.images and f.attributes):
            raise UserError("--images and --attributes go together")
        images, names = _read_images(f.images)
        result = judge.score(images, _read_attributes(f.attributes, names))
        result["images"] = f.images
    else:
        data = ml_collections.ConfigDict(load_meta(f.workdir)["data"])
        data.cache = False
        if f.num <= 0:
            raise UserError(f"--num must be positive, got {f.num}")
        data.num_examples = f.num
        if f.data_dir:
            data.source, data.data_dir, data.name = "tfds", f.data_dir, f.dataset
        else:
            data.source = "synthface"
        if f.image_size:
            data.image_size = f.image_size
        if f.synthface_seed is not None:
            data.synthface_seed = f.synthface_seed
        batches = images_lib.image_batches(data, f.split, f.batch_size, shuffle=False,
                                           repeat=False, drop_remainder=False,
                                           process_index=0, process_count=1)
        result = judge.score_batches(batches)
        result["split"] = f.split
        result["source"] = data.source
    print(json.dumps(result))


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "The judge's training directory.")
    flags.DEFINE_string("split", "test", "Split to score: train, test or test_heldout_combos.")
    flags.DEFINE_integer("num", 1000, "Number of faces of the split to score.")
    flags.DEFINE_string("data_dir", None, "Read the split from this TFDS data dir (default: "
                        "render SynthFace on the fly).")
    flags.DEFINE_string("dataset", "synthface", "TFDS dataset name[/config] (with --data_dir).")
    flags.DEFINE_integer("image_size", None, "Image size to render / resize to (default: the "
                         "judge's training size).")
    flags.DEFINE_integer("synthface_seed", None, "SynthFace seed (default: the training seed).")
    flags.DEFINE_integer("batch_size", 256, "Images per judge call.")
    flags.DEFINE_string("images", None, "Score these images instead: an .npz or a dir of PNGs.")
    flags.DEFINE_string("attributes", None, "With --images: JSON list of dicts (one per image) "
                        "or dict file name -> dict.")


if __name__ == "__main__":
    from unif2ace_jax.errors import run_cli

    _define_flags()
    run_cli(main)
