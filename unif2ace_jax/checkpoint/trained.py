"""A unified-model training workdir: its run file, and the trained model read back from it.

A training workdir holds (written by `train.train`)::

    DIR/run.json           {"config": <the full config>, "text_tokenizer": <abs path>,
                            "tokenizer_workdir": <abs path or "">, "text_vocab_size": V_text,
                            "num_image_codes": K, "image_grid": h,
                            "feature_shapes": {...}, optionally "feature_encoders":
                            {key: {"encoder", "workdir"}} (see `feature_encoder_specs`)}
    DIR/checkpoints/       Orbax: "state" (`checkpoint.state`) + "data" (the input iterator position)
    DIR/metrics.jsonl

`load_trained(DIR)` rebuilds the model from ``run.json`` and restores the newest parameters, so
`generate`, `ask` and `evaluate` need nothing but ``--workdir``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from unif2ace_jax.checkpoint.manager import Checkpointer
from unif2ace_jax.checkpoint.state import abstract_state, state_shardings
from unif2ace_jax.data import records
from unif2ace_jax.data.embeddings import compute_features
from unif2ace_jax.data.text_tokenizer import make_text_tokenizer
from unif2ace_jax.errors import UserError
from unif2ace_jax.models.encoders import ENCODERS, load_encoder
from unif2ace_jax.models.moe.seq_moe import feature_keys
from unif2ace_jax.models.tokenizer.pretrained import load_tokenizer
from unif2ace_jax.models.unified import UnifiedModel, build_model, default_features
from unif2ace_jax.optim import make_optimizer
from unif2ace_jax.parallel import rules as rules_lib
from unif2ace_jax.parallel.mesh import make_mesh
from unif2ace_jax.utils.files import read_json, write_json

RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"


# ---------------------------------------------------------------------------------------------
# Run metadata


def save_run_info(workdir: str, config: ml_collections.ConfigDict, **info: Any) -> None:
    """Writes ``DIR/run.json`` (process 0 only), atomically."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    payload = {"config": json.loads(config.to_json_best_effort()), **info}
    write_json(os.path.join(workdir, RUN_FILE), payload, indent=1)


def load_run_info(workdir: str) -> dict:
    """``run.json`` of a training workdir; UserError when the directory or file is missing."""
    if not workdir:
        raise UserError("--workdir is required")
    if not os.path.isdir(workdir):
        raise UserError(f"workdir does not exist: {workdir}")
    path = os.path.join(workdir, RUN_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{workdir} is not a unified-model training directory (no {RUN_FILE}); "
                        f"train one with python -m unif2ace_jax.train --config=... "
                        f"--workdir={workdir}")
    info = read_json(path, RUN_FILE)
    info["config"] = ml_collections.ConfigDict(info["config"])
    return info


# ---------------------------------------------------------------------------------------------
# A trained run, for inference


@dataclasses.dataclass
class Trained:
    """A trained unified model read back from its workdir."""

    workdir: str
    config: ml_collections.ConfigDict
    model: UnifiedModel
    params: Any
    step: int
    info: dict
    mesh: Mesh
    rules: rules_lib.Rules
    _text_tokenizer: Any = None
    _image_tokenizer: Any = None
    _feature_encoders: Any = None

    @property
    def text_tokenizer(self):
        if self._text_tokenizer is None:
            path = self.info["text_tokenizer"]
            if not os.path.exists(path):  # a file (sentencepiece) or a directory (gpt2_bpe)
                raise UserError(f"the text tokenizer this run used is gone: {path}")
            self._text_tokenizer = make_text_tokenizer(self.info.get("text_tokenizer_name",
                                                                     "sentencepiece"), path)
        return self._text_tokenizer

    @property
    def image_tokenizer(self):
        """The image tokenizer the run was trained with (`TrainedTokenizer`); UserError if none."""
        if self._image_tokenizer is None:
            path = self.info.get("tokenizer_workdir") or ""
            if not path:
                raise UserError(f"the run in {self.workdir} names no image tokenizer "
                                f"(config.tokenizer_workdir was empty)")
            self._image_tokenizer = load_tokenizer(path)
        return self._image_tokenizer

    @property
    def feature_encoders(self) -> dict:
        """``{feature_key: LoadedEncoder}``: the frozen encoders of the seq-MoE's image
        features (e.g. clip, face), loaded on first use (`feature_encoder_specs` says where
        from). Empty when the model reads no such feature."""
        if self._feature_encoders is None:
            specs = feature_encoder_specs(self.config, self.info, strict=True)
            self._feature_encoders = {
                key: load_encoder(spec["encoder"], {"workdir": spec["workdir"],
                                                    "path": spec["workdir"],
                                                    "output": spec.get("output", "pooled")})
                for key, spec in specs.items()}
        return self._feature_encoders

    def image_features(self, images) -> dict:
        """Seq-MoE features of new images computed on the fly: uint8 ``[B, H, W, 3]`` ->
        ``{feature_key: float32 [B, D]}`` (what a prepared record would hold; `data.embeddings`)."""
        encoders = self.feature_encoders
        return compute_features(encoders, images) if encoders else {}


def frozen_feature_keys(config: ml_collections.ConfigDict) -> dict[str, str]:
    """``{feature_key: encoder name}`` of the seq-MoE features made by frozen encoders outside
    the model (clip, face; the in-model ``noise`` is left out). Empty without a seq-MoE."""
    seq_moe = config.model.get("seq_moe", None)
    if seq_moe is None or seq_moe.get("name", "none") == "none":
        return {}
    return {k: enc for k, enc in feature_keys(seq_moe).items() if not ENCODERS.get(enc).in_model}


def _dataset_embeddings(data: ml_collections.ConfigDict) -> dict:
    """``metadata.json["embeddings"]["fields"]`` of the run's dataset (written by
    `data.embeddings`), or {} when it has none or is gone."""
    try:
        builder = records.load_builder(data.data_dir, data.dataset,
                                       data.get("config_name") or None)
        path = os.path.join(str(builder.data_dir), "metadata.json")
        with open(path) as f:
            made = json.load(f).get("embeddings", {})
        return {k: dict(v, output=made.get("output", "pooled"))
                for k, v in made.get("fields", {}).items()}
    except Exception:  # noqa: BLE001  (no dataset, no metadata: nothing recorded there)
        return {}


def feature_encoder_specs(config: ml_collections.ConfigDict,
                          info: Mapping[str, Any] | None = None, *,
                          strict: bool = False) -> dict[str, dict]:
    """Where the frozen encoders of the run's seq-MoE features are: ``{feature_key: {"encoder":
    name, "workdir": dir}}`` (what `ask` needs to compute the features of a new image).

    Looked up, first found wins, per feature key:

    1. ``run.json["feature_encoders"][key]`` (`info`; recorded at training time);
    2. ``config.encoders.<key>.workdir`` (and optional ``.name``);
    3. ``config.model.seq_moe.experts.<expert>.encoder_config.workdir`` (or ``.path``);
    4. the training dataset's ``metadata.json`` (`data.embeddings` records the encoder and
       workdir of every field it wrote).

    The encoder name is the expert's ``encoder`` unless that is ``precomputed``; then it comes
    from the same source as the workdir. With ``strict`` a key found nowhere is a UserError;
    otherwise it is left out (use this at training time to record what is known).
    """
    keys = frozen_feature_keys(config)
    if not keys:
        return {}
    recorded = dict((info or {}).get("feature_encoders") or {})
    encoders_cfg = config.get("encoders", None) or {}
    experts = config.model.seq_moe.get("experts", None) or {}
    from_data = None
    out = {}
    for key, encoder in keys.items():
        spec = dict(recorded.get(key) or {})
        if not spec.get("workdir") and key in encoders_cfg and encoders_cfg[key].get("workdir"):
            spec = {"workdir": encoders_cfg[key].workdir,
                    "encoder": encoders_cfg[key].get("name", None)}
        if not spec.get("workdir"):
            for expert in experts.values():
                enc_cfg = expert.get("encoder_config", None) or {}
                if expert.get("feature_key") == key and (enc_cfg.get("workdir", None)
                                                         or enc_cfg.get("path", None)):
                    spec = {"workdir": enc_cfg.get("workdir", None) or enc_cfg.get("path")}
                    break
        if not spec.get("workdir"):
            if from_data is None:
                from_data = _dataset_embeddings(config.data)
            spec = dict(from_data.get(key) or {})
        if not spec.get("encoder") or spec.get("encoder") == "precomputed":
            spec["encoder"] = encoder if encoder != "precomputed" else spec.get("encoder")
        if not spec.get("workdir") or not spec.get("encoder") or spec["encoder"] == "precomputed":
            if strict:
                raise UserError(
                    f"the run's seq-MoE reads the image feature {key!r}, but the run records no "
                    f"encoder to compute it from a new image; set config.encoders.{key}.workdir "
                    f"(and .name) or train on a dataset prepared by python -m "
                    f"unif2ace_jax.data.embeddings")
            continue
        out[key] = {"encoder": str(spec["encoder"]), "workdir": os.path.abspath(spec["workdir"]),
                    **({"output": spec["output"]} if spec.get("output") else {})}
    return out


def model_from_info(info: Mapping[str, Any]) -> UnifiedModel:
    return build_model(info["config"].model, text_vocab_size=int(info["text_vocab_size"]),
                       num_image_codes=int(info["num_image_codes"]),
                       image_grid=int(info["image_grid"]))


def load_trained(workdir: str, *, step: int | None = None,
                 mesh_config: Mapping[str, int] | None = None, mesh: Mesh | None = None
                 ) -> Trained:
    """Rebuilds the model of a training workdir and restores its parameters (newest step).

    The parameters are laid out on `mesh` (else one made from `mesh_config`, default: all
    devices on ``fsdp``) with the run's sharding rules. UserError when the workdir, its run
    file or a checkpoint is missing.
    """
    info = load_run_info(workdir)
    config = info["config"]
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"no checkpoint in {workdir} (training has not saved one yet)")
    checkpointer = Checkpointer(ckpt_dir, with_data=False, async_save=False)
    latest = checkpointer.latest_step() if step is None else step
    if latest is None:
        raise UserError(f"no checkpoint in {ckpt_dir} (training has not saved one yet)")
    model = model_from_info(info)
    tx, _ = make_optimizer(config.optim, int(config.total_steps))
    mesh = mesh if mesh is not None else make_mesh(mesh_config or {"fsdp": -1})
    rules = rules_lib.get_rules(tuple(config.get("sharding", {}).get("rules", ())))
    abstract, shardings = state_shardings(model, tx, mesh, rules, _saved_features(info))
    try:
        state = checkpointer.restore(abstract_state(abstract, shardings), step=latest)
    except FileNotFoundError as e:
        raise UserError(f"cannot restore step {latest} from {ckpt_dir}: {e}") from None
    checkpointer.close()
    return Trained(workdir=workdir, config=config, model=model, params=state["params"],
                   step=int(state["step"]), info=info, mesh=mesh, rules=rules)


def _saved_features(info: Mapping[str, Any]) -> dict | None:
    """Dummy seq-MoE features with the shapes training used (None when there were none)."""
    shapes = info.get("feature_shapes") or {}
    if not shapes:
        return None
    # The recorded fields leave out task / mask_ratio (the noise expert's input): add them back.
    extra = {k: jnp.zeros(tuple(v["shape"]), v["dtype"]) for k, v in shapes.items()}
    rows = next(iter(extra.values())).shape[0]
    return default_features(jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), jnp.float32),
                            extra)
