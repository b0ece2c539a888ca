"""Show-o (or a plain Hugging Face Phi) checkpoint -> a unified-model workdir.

Usage::

    python -m unif2ace_jax.convert.showo --checkpoint=DIR [--phi_config=DIR] \\
        [--text_tokenizer=DIR] [--tokenizer_workdir=TOK] [--max_seq_length=128] --out=OUT

Two inputs are accepted:

* **Show-o** (``showlab/show-o`` layout): ``DIR/config.json`` (Show-o's: ``vocab_size``,
  ``llm_vocab_size``, ``codebook_size``, ``num_vq_tokens``, ``llm_model_path``) and
  ``DIR/pytorch_model.safetensors`` with ``showo.``-prefixed Phi tensors. The Phi geometry comes
  from ``--phi_config`` or else from the ``llm_model_path`` directory beside the checkpoint
  (its ``config.json``). Vocabulary: `Vocab` layout ``"showo"`` (text ``llm_vocab_size``, then
  ``[PAD] <|soi|> … <|lvg|>``, the ``codebook_size`` codes, ``[MASK]`` = the last id).
* **plain HF Phi** (``PhiForCausalLM.save_pretrained``): ``DIR/config.json`` with
  ``model_type: phi`` and ``DIR/model.safetensors`` (keys ``model.layers.N…``, ``lm_head``). It
  converts as a text LM in the same ``"showo"`` layout over its rows: text ids are those of the
  tokenizer (``--text_tokenizer``'s size, else Phi-1.5's 50295); the rows after them (untrained
  in Phi) hold ``[PAD]`` and Show-o's nine tokens, then "image codes" up to the last row, which
  is ``[MASK]``. With Phi-1.5's 51200 rows that is 894 codes (ids 50305…51198) and mask 51199.
  ``image_grid`` is recorded as 1; the workdir names no image tokenizer.

QK-LayerNorm (``…self_attn.{q,k}_layernorm.{weight,bias}``) is detected from the tensors (Show-o
forces it on whatever its Phi config says). Tensor mapping (torch Linear ``weight [out, in]``
becomes ``kernel = weightᵀ``, reshaped to the Flax layout; layers stacked on a leading axis as
the scanned backbone holds them):

=============================================  ================================================
Phi (prefix ``showo.`` for Show-o)             unified-model params
=============================================  ================================================
model.embed_tokens.weight [V, D]               embed_tokens/embedding [V, D]
model.layers.i.input_layernorm.{weight,bias}   layers/input_layernorm/{scale,bias} [i]
model.layers.i.self_attn.{q,k,v}_proj          layers/self_attn/{q,k,v}_proj/kernel [i, D, H, Dh]
                                               (Wᵀ reshaped), bias [i, H, Dh]
model.layers.i.self_attn.{q,k}_layernorm       layers/self_attn/{q,k}_layernorm/{scale,bias} [i]
model.layers.i.self_attn.dense                 layers/self_attn/dense/kernel [i, H, Dh, D], bias
model.layers.i.mlp.fc{1,2}                     layers/mlp/fc{1,2}/{kernel (Wᵀ), bias} [i]
model.final_layernorm.{weight,bias}            final_layernorm/{scale,bias}
lm_head.{weight,bias} [V, D], [V]              lm_head/kernel [D, V], bias [V]
=============================================  ================================================

Everything is checked from the safetensors header (names and shapes) before a tensor is read;
a missing, extra or wrongly shaped tensor is one UserError naming it, and nothing is written.
Tensors are then streamed one at a time into preallocated float32 arrays (one copy of the
model in memory), and saved as step 0 of an Orbax checkpoint in the trainer's layout
(``OUT/checkpoints``, item ``state``: params + zero AdamW state) with ``OUT/run.json``, so
`checkpoint.trained.load_trained` (and `load_showo` here) read it. OUT is written under a
temporary name and renamed when complete.

The workdir's config makes `generate` and `ask` run Show-o's inference: ``sampling`` holds
``prompt_format="showo"`` (Show-o's prompts and masks), MaskGIT with Show-o's schedule
(``temperature_annealing="showo_compound"``, ``remask_rule="showo"``), 16 steps, guidance 1.75,
and at most 100 answer tokens (``inference_*.py`` defaults); ``data.max_text_len`` is
``--max_seq_length - 2``, so the T2I text part is Show-o's ``max_seq_length + 1`` ids wide.
``--tokenizer_workdir`` names the image tokenizer (a workdir of `convert.magvit2`, e.g. Show-o's
MAGVIT-v2), which must have the checkpoint's ``codebook_size`` codes and a ``sqrt(num_vq_tokens)``
grid; without it the workdir names none (`generate` / `ask` then refuse).

`load_showo` (from `convert.showo_parity`, re-exported here) is the parity API: logits for
explicit ids and a boolean attention matrix with positions ``0 … L-1`` (Show-o's calling
convention), and greedy text continuation with a KV cache (Show-o's ``mmu_generate``,
``top_k=1``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shutil
import tempfile
from typing import Any, Iterator

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import flags, logging
from flax import traverse_util
from safetensors import SafetensorError, safe_open

from unif2ace_jax import optim
from unif2ace_jax.checkpoint.manager import Checkpointer
from unif2ace_jax.checkpoint.trained import CHECKPOINT_DIR, save_run_info
from unif2ace_jax.cli import no_positional, quiet_logs, require
from unif2ace_jax.convert.showo_parity import ShowoModel, load_showo
from unif2ace_jax.data.text_tokenizer import make_text_tokenizer
from unif2ace_jax.errors import UserError, run_cli
from unif2ace_jax.models import backbone as backbone_lib
from unif2ace_jax.models.tokenizer import make_tokenizer
from unif2ace_jax.models.tokenizer.pretrained import load_config as load_tokenizer_config
from unif2ace_jax.models.unified import build_model
from unif2ace_jax.models.vocab import PHI_ENDOFTEXT_ID, SHOWO_ADDED
from unif2ace_jax.utils.files import read_json_object

__all__ = ["Source", "convert_directory", "read_source", "ShowoModel", "load_showo"]

SHOWO_WEIGHTS = "pytorch_model.safetensors"
PHI_WEIGHTS = "model.safetensors"
SHOWO_PREFIX = "showo."
PHI15_TEXT_SIZE = 50295  # Phi-1.5's tokenizer: 50257 BPE ids + 38 added whitespace tokens
PROGRESS_EVERY = 50  # tensors per progress line
SHOWO_MAX_SEQ_LENGTH = 128  # configs/showo_demo*.yaml
SHOWO_MAX_NEW_TOKENS = 100  # inference_mmu.py


@dataclasses.dataclass(frozen=True)
class Source:
    """What the checkpoint directory says: weights file, tensor prefix, geometry, vocabulary."""

    weights: str
    prefix: str
    kind: str  # "showo" | "phi"
    d_model: int
    num_layers: int
    num_heads: int
    ffn_hidden: int
    rotary_fraction: float
    rope_theta: float
    layer_norm_eps: float
    vocab_size: int
    text_size: int
    num_image_codes: int
    image_grid: int
    qk_layernorm: bool = False

    def describe(self) -> str:
        return (f"{self.kind}: {self.num_layers} layers, width {self.d_model}, "
                f"{self.num_heads} heads, FFN {self.ffn_hidden}, vocabulary {self.vocab_size} "
                f"(text {self.text_size}, {self.num_image_codes} codes), QK-LayerNorm "
                f"{'on' if self.qk_layernorm else 'off'}")


# ---------------------------------------------------------------------------------------------
# Reading the inputs


def _rope_field(phi: dict, key: str, default: float) -> float:
    """A rotary field at the top of a Phi config (transformers 4) or in ``rope_parameters`` (5)."""
    if phi.get(key) is not None:
        return float(phi[key])
    return float((phi.get("rope_parameters") or {}).get(key, default))


def _phi_geometry(phi: dict, where: str) -> dict:
    """Backbone fields from a transformers ``PhiConfig`` dict; UserError for what we lack."""
    try:
        return _phi_fields(phi, where)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: bad or missing field {e}") from None


def _phi_fields(phi: dict, where: str) -> dict:
    if phi.get("model_type", "phi") != "phi":
        raise UserError(f"{where}: model_type {phi.get('model_type')!r} is not phi")
    if phi.get("hidden_act", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise UserError(f"{where}: hidden_act {phi['hidden_act']!r} is not the tanh GELU")
    heads = int(phi["num_attention_heads"])
    if int(phi.get("num_key_value_heads") or heads) != heads:
        raise UserError(f"{where}: grouped-query attention (num_key_value_heads) is unsupported")
    if phi.get("rope_scaling") or (phi.get("rope_parameters") or {}).get(
            "rope_type", "default") != "default":
        raise UserError(f"{where}: rotary scaling is unsupported")
    if phi.get("tie_word_embeddings"):
        raise UserError(f"{where}: tied embeddings are unsupported (Phi's lm_head is its own)")
    return dict(d_model=int(phi["hidden_size"]), num_layers=int(phi["num_hidden_layers"]),
                num_heads=heads, ffn_hidden=int(phi["intermediate_size"]),
                rotary_fraction=_rope_field(phi, "partial_rotary_factor", 0.5),
                rope_theta=_rope_field(phi, "rope_theta", 1e4),
                layer_norm_eps=float(phi.get("layer_norm_eps", 1e-5)))


def read_source(checkpoint_dir: str, phi_config: str | None = None,
                text_size: int | None = None) -> Source:
    """`Source` of a Show-o or plain-Phi checkpoint directory (configs only; no tensor read)."""
    if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
        raise UserError(f"--checkpoint is not a directory: {checkpoint_dir!r}")
    config_path = os.path.join(checkpoint_dir, "config.json")
    cfg = read_json_object(config_path, "checkpoint config")
    if cfg.get("model_type") == "phi":  # a plain Hugging Face Phi
        weights = os.path.join(checkpoint_dir, PHI_WEIGHTS)
        geometry = _phi_geometry(cfg, config_path)
        vocab_size = int(cfg["vocab_size"])
        text = PHI15_TEXT_SIZE if text_size is None else int(text_size)
        k = vocab_size - text - len(SHOWO_ADDED) - 1
        if k < 1:
            raise UserError(f"{config_path}: vocab_size {vocab_size} leaves no room after "
                            f"{text} text ids for Show-o's {len(SHOWO_ADDED)} tokens and [MASK]")
        return Source(weights=weights, prefix="", kind="phi", vocab_size=vocab_size,
                      text_size=text, num_image_codes=k, image_grid=1, **geometry)
    if "llm_vocab_size" not in cfg:
        raise UserError(f"{config_path} is neither Show-o's config (llm_vocab_size, "
                        f"codebook_size, …) nor a Phi config (model_type phi)")
    if phi_config is None:
        llm = str(cfg.get("llm_model_path") or "")
        phi_config = llm if os.path.isabs(llm) else os.path.join(checkpoint_dir, llm)
    phi_path = (os.path.join(phi_config, "config.json") if os.path.isdir(phi_config)
                else phi_config)
    geometry = _phi_geometry(read_json_object(phi_path, "Phi config"), phi_path)
    try:
        vocab_size, text = int(cfg["vocab_size"]), int(cfg["llm_vocab_size"])
        k, n = int(cfg["codebook_size"]), int(cfg["num_vq_tokens"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{config_path}: bad or missing field {e}") from None
    if text_size is not None and int(text_size) != text:
        raise UserError(f"--text_tokenizer has {text_size} text ids; the checkpoint's "
                        f"llm_vocab_size is {text}")
    if vocab_size != text + len(SHOWO_ADDED) + k + 1:
        raise UserError(f"{config_path}: vocab_size {vocab_size} is not llm_vocab_size {text} "
                        f"+ {len(SHOWO_ADDED)} + codebook_size {k} + 1")
    if int(cfg.get("mask_token_id", vocab_size - 1)) != vocab_size - 1:
        raise UserError(f"{config_path}: mask_token_id is not vocab_size - 1")
    grid = math.isqrt(n)
    if grid * grid != n:
        raise UserError(f"{config_path}: num_vq_tokens {n} is not a square grid")
    return Source(weights=os.path.join(checkpoint_dir, SHOWO_WEIGHTS), prefix=SHOWO_PREFIX,
                  kind="showo", vocab_size=vocab_size, text_size=text, num_image_codes=k,
                  image_grid=grid, **geometry)


@contextlib.contextmanager
def _open_weights(path: str) -> Iterator[Any]:
    if not os.path.isfile(path):
        raise UserError(f"missing file {path}")
    try:
        with safe_open(path, framework="np") as f:
            yield f
    except (SafetensorError, OSError, TypeError, ValueError) as e:
        raise UserError(f"cannot read {path}: {' '.join(str(e).split())}") from None


# ---------------------------------------------------------------------------------------------
# The mapping


def model_config(source: Source) -> ml_collections.ConfigDict:
    """``config.model`` of the converted model."""
    return backbone_lib.full_model_config(dict(
        num_image_codes=source.num_image_codes, image_grid=source.image_grid,
        d_model=source.d_model, num_layers=source.num_layers, num_heads=source.num_heads,
        ffn=dict(name="dense", hidden=source.ffn_hidden), block_style="parallel",
        rotary_fraction=source.rotary_fraction, rope_theta=source.rope_theta,
        layer_norm_eps=source.layer_norm_eps, qk_layernorm=source.qk_layernorm,
        vocab_layout="showo", position_mode="absolute", scan_layers=True))


def _torch_name(path: tuple[str, ...], layer: int | None) -> str:
    """Flax param path (``layers`` stacked) -> Phi tensor name, without the Show-o prefix."""
    *mods, leaf = path
    leaf = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
    if mods[0] == "layers":
        return ".".join(["model.layers", str(layer), *mods[1:], leaf])
    if mods[0] == "lm_head":
        return f"lm_head.{leaf}"
    return ".".join(["model", *mods, leaf])


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one tensor goes: Flax path, layer (None = not stacked), shapes."""

    path: tuple[str, ...]
    layer: int | None
    torch_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]  # per layer


def expected_tensors(source: Source) -> dict[str, Target]:
    """``{tensor name: Target}`` of the converted model (from its abstract init)."""
    model = build_model(model_config(source), text_vocab_size=source.text_size,
                        num_image_codes=source.num_image_codes, image_grid=source.image_grid)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0))))["params"]
    table = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        stacked = path[0] == "layers"
        per_layer = tuple(leaf.shape[1:] if stacked else leaf.shape)
        for layer in (range(source.num_layers) if stacked else [None]):
            table[source.prefix + _torch_name(path, layer)] = Target(
                path, layer, _torch_shape(path, per_layer), per_layer)
    return table


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch tensor shape of one (per-layer) Flax param."""
    if path[-1] != "kernel":
        return (int(np.prod(shape)),) if path[-2].endswith("_proj") else shape  # bias [H, Dh]
    n_in = 2 if path[-2] == "dense" else 1  # dense: [H, Dh, D]; q/k/v_proj: [D, H, Dh]
    return (int(np.prod(shape[n_in:])), int(np.prod(shape[:n_in])))


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _first(names: set[str]) -> str:
    ordered = sorted(names, key=_natural)
    more = f" (and {len(ordered) - 1} more)" if len(ordered) > 1 else ""
    return f"{ordered[0]!r}{more}"


def check_tensors(f: Any, source: Source) -> tuple[Source, dict[str, Target]]:
    """Checks names and shapes from the header (reads no tensor); QK-LayerNorm is on when the
    checkpoint has any ``{q,k}_layernorm`` tensor (then every layer needs all four).

    Returns ``(source with qk_layernorm set, expected_tensors)``; UserError naming the first
    missing, unexpected or wrongly shaped tensor.
    """
    names = set(f.keys())
    qk = any(re.search(r"\.self_attn\.[qk]_layernorm\.", n) for n in names)
    source = dataclasses.replace(source, qk_layernorm=qk)
    expected = expected_tensors(source)
    if set(expected) - names:
        raise UserError(f"checkpoint lacks tensor {_first(set(expected) - names)}")
    if names - set(expected):
        raise UserError(f"checkpoint has unexpected tensor {_first(names - set(expected))}")
    for name in sorted(expected, key=_natural):
        got, want = tuple(f.get_slice(name).get_shape()), expected[name].torch_shape
        if got != want:
            raise UserError(f"checkpoint tensor {name!r} has shape {list(got)}, expected "
                            f"{list(want)} ({source.describe()})")
    return source, expected


def stream_params(f: Any, source: Source, expected: dict[str, Target],
                  progress_every: int = PROGRESS_EVERY) -> dict:
    """Reads the tensors one at a time into preallocated float32 arrays; nested params.

    Only one tensor is held besides the output (its transpose is a view written in place)."""
    flat: dict[tuple[str, ...], np.ndarray] = {}
    names = sorted(expected, key=_natural)
    for count, name in enumerate(names, 1):
        t = expected[name]
        if t.path not in flat:
            lead = () if t.layer is None else (source.num_layers,)
            flat[t.path] = np.empty(lead + t.flax_shape, np.float32)
        dst = flat[t.path] if t.layer is None else flat[t.path][t.layer]
        tensor = f.get_tensor(name)
        dst[...] = (tensor.T if t.path[-1] == "kernel" else tensor).reshape(t.flax_shape)
        del tensor
        if count % progress_every == 0 or count == len(names):
            print(f"[convert] {count}/{len(names)} tensors", flush=True)
    return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------------------------
# Writing the workdir


def run_config(source: Source, text_tokenizer: str, tokenizer_workdir: str = "",
               max_seq_length: int = SHOWO_MAX_SEQ_LENGTH) -> ml_collections.ConfigDict:
    """The workdir's config: the model, Show-o's optimizer settings, the BPE tokenizer, and
    Show-o's inference (prompts, sampler; see the module docstring)."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 1
    config.tokenizer_workdir = tokenizer_workdir
    config.model = model_config(source)
    config.optim = optim.full_config(dict(lr=1e-4, weight_decay=0.01))
    config.data = ml_collections.ConfigDict(dict(
        tokenizer=dict(name="gpt2_bpe", model_path=text_tokenizer, vocab_size=source.text_size),
        max_text_len=max_seq_length - 2))
    config.sampling = ml_collections.ConfigDict(dict(
        prompt_format="showo", sampler="maskgit", steps=16, guidance=1.75,
        noise_temperature=1.0, sample_temperature=1.0, schedule="cosine",
        temperature_annealing="showo_compound", remask_rule="showo",
        max_answer_tokens=SHOWO_MAX_NEW_TOKENS))
    config.sharding = ml_collections.ConfigDict(dict(rules=()))
    config.convert = ml_collections.ConfigDict(dict(source=source.describe()))
    return config


def _zero_opt_state(config: ml_collections.ConfigDict, params: dict) -> Any:
    """The optimizer state of `params` as zeros, each a zero-stride view (no memory)."""
    tx, _ = optim.make_optimizer(config.optim, int(config.total_steps))
    abstract = jax.eval_shape(tx.init, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    return jax.tree.map(lambda x: np.broadcast_to(np.zeros((), x.dtype), x.shape), abstract)


@contextlib.contextmanager
def _numpy_saved_in_place() -> Iterator[None]:
    """Orbax deep-copies numpy arrays before writing them; the converter's arrays never change
    while it saves, so skip that second copy of the model (restored afterwards)."""
    handlers = ocp.type_handlers

    def register(handler) -> None:  # without orbax's "overriding np.ndarray" warning
        verbosity = logging.get_verbosity()
        logging.set_verbosity(logging.ERROR)
        try:
            handlers.register_type_handler(np.ndarray, handler, override=True)
        finally:
            logging.set_verbosity(verbosity)

    register(handlers.NumpyHandler(deepcopy_host_arrays=False))
    try:
        yield
    finally:
        register(handlers.NumpyHandler())


def write_workdir(out_dir: str, source: Source, params: dict, text_tokenizer: str,
                  tokenizer_workdir: str = "",
                  max_seq_length: int = SHOWO_MAX_SEQ_LENGTH) -> None:
    """``out_dir/run.json`` + ``out_dir/checkpoints`` (step 0) for `params` (nested numpy)."""
    config = run_config(source, text_tokenizer, tokenizer_workdir, max_seq_length)
    state = {"step": np.zeros((), np.int32), "params": params,
             "opt_state": _zero_opt_state(config, params)}
    with _numpy_saved_in_place():
        checkpointer = Checkpointer(os.path.join(out_dir, CHECKPOINT_DIR), with_data=False,
                                    async_save=False)
        checkpointer.save(0, state, force=True)
        checkpointer.close()
    save_run_info(out_dir, config, text_tokenizer=text_tokenizer,
                  text_tokenizer_name="gpt2_bpe", tokenizer_workdir=tokenizer_workdir,
                  text_vocab_size=source.text_size, num_image_codes=source.num_image_codes,
                  image_grid=source.image_grid, feature_shapes={}, feature_encoders={},
                  converted_from=source.kind)


def _text_size(text_tokenizer: str | None) -> int | None:
    if not text_tokenizer:
        return None
    tok = make_text_tokenizer("gpt2_bpe", text_tokenizer)
    if tok.eos_id != PHI_ENDOFTEXT_ID:
        raise UserError(f"--text_tokenizer: <|endoftext|> has id {tok.eos_id}, not "
                        f"{PHI_ENDOFTEXT_ID} (Phi-1.5's tokenizer)")
    return tok.vocab_size


def _check_image_tokenizer(tokenizer_workdir: str, source: Source) -> None:
    """The image tokenizer must make the checkpoint's codes: K codes on its grid."""
    config, _ = load_tokenizer_config(tokenizer_workdir)
    model = make_tokenizer(config.model)
    grid = int(config.data.image_size) // model.downsample_factor
    if (model.codebook_size, grid) != (source.num_image_codes, source.image_grid):
        raise UserError(f"--tokenizer_workdir {tokenizer_workdir} makes {model.codebook_size} "
                        f"codes on a {grid}x{grid} grid; the checkpoint needs "
                        f"{source.num_image_codes} codes on {source.image_grid}x"
                        f"{source.image_grid}")


def convert_directory(checkpoint_dir: str, out_dir: str, *, phi_config: str | None = None,
                      text_tokenizer: str | None = None, tokenizer_workdir: str | None = None,
                      max_seq_length: int = SHOWO_MAX_SEQ_LENGTH,
                      progress_every: int = PROGRESS_EVERY) -> Source:
    """Converts `checkpoint_dir` into the workdir `out_dir` (which must not exist yet).

    Everything is checked before anything is written; on any error no `out_dir` is left.
    """
    if not out_dir:
        raise UserError("--out is required")
    if os.path.exists(out_dir):
        raise UserError(f"--out already exists: {out_dir} (give a new directory)")
    if max_seq_length < 3:
        raise UserError(f"--max_seq_length must be >= 3, got {max_seq_length}")
    source = read_source(checkpoint_dir, phi_config, _text_size(text_tokenizer))
    tokenizer_path = os.path.abspath(text_tokenizer) if text_tokenizer else ""
    image_tokenizer = os.path.abspath(tokenizer_workdir) if tokenizer_workdir else ""
    if image_tokenizer:
        _check_image_tokenizer(image_tokenizer, source)
    with _open_weights(source.weights) as f:
        source, expected = check_tensors(f, source)
        print(f"[convert] {source.describe()}; {len(expected)} tensors", flush=True)
        params = stream_params(f, source, expected, progress_every)
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    try:
        write_workdir(tmp, source, params, tokenizer_path, image_tokenizer, max_seq_length)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0o700 -> what makedirs would have given
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return source


def main(argv: list[str]) -> None:
    no_positional(argv)
    quiet_logs()
    f = flags.FLAGS
    checkpoint, out = require("checkpoint"), require("out")
    source = convert_directory(checkpoint, out, phi_config=f.phi_config or None,
                               text_tokenizer=f.text_tokenizer or None,
                               tokenizer_workdir=f.tokenizer_workdir or None,
                               max_seq_length=f.max_seq_length)
    print(f"converted {source.describe()} -> {out}")


if __name__ == "__main__":
    flags.DEFINE_string("checkpoint", None, "Show-o checkpoint directory (config.json + "
                        "pytorch_model.safetensors) or a Hugging Face Phi one (model.safetensors)")
    flags.DEFINE_string("phi_config", "", "the Phi config (directory or config.json); default: "
                        "Show-o's llm_model_path beside the checkpoint")
    flags.DEFINE_string("text_tokenizer", "", "Phi-1.5's tokenizer directory (gpt2_bpe), "
                        "recorded in run.json")
    flags.DEFINE_string("tokenizer_workdir", "", "image tokenizer workdir (convert.magvit2 of "
                        "Show-o's MAGVIT-v2), recorded in run.json for generate / ask")
    flags.DEFINE_integer("max_seq_length", SHOWO_MAX_SEQ_LENGTH, "Show-o's max_seq_length "
                         "(T2I text part = max_seq_length + 1 ids)")
    flags.DEFINE_string("out", None, "workdir to write (must not exist)")
    run_cli(main)
