"""Parameter count of the unified model by module, and active parameters per token.

    python -m unif2ace_jax.summary --config=configs/unif2ace_1p8b.py
    python -m unif2ace_jax.summary --config=configs/synthface_tiny.py:tiny,moe=both \\
        --text_vocab_size=512

Shapes come from ``jax.eval_shape`` of the model's init: nothing is materialised, so the paper
config is counted in seconds on a laptop. Rows: token embedding, attention, layer norms, dense
FFN, token-MoE router / shared experts / routed experts per group (und, gen), seq-MoE router and
one row per seq-MoE expert, lm head (and "other" for anything unrecognised, so rows always add up
to the total).

Active parameters per token (one number per group: a T2I token is gen, MMU / LM tokens und):
everything except what the token's routing leaves idle, i.e. the other group's shared and routed
experts, the ``E - k`` routed experts of its own group it does not pick, the other group's router
columns, and the seq-MoE experts outside its group. Of its own group's seq-MoE experts the most
expensive ``top_k`` distinct ones are counted (the sequence router's choice is data dependent,
so this is an upper bound); ``copy`` / ``zero`` have no parameters. The token embedding is counted
whole (as MoE reports usually do).

The text vocabulary size (which the model takes from the text tokenizer) comes from
``--text_vocab_size``, else ``config.data.tokenizer.vocab_size`` (> 0), else the tokenizer file
``config.data.tokenizer.model_path`` when it exists, else ``config.assumed_text_vocab_size``.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from unif2ace_jax import cli
from unif2ace_jax.data.text_tokenizer import make_text_tokenizer
from unif2ace_jax.errors import UserError, run_cli
from unif2ace_jax.models.moe.seq_moe import dummy_features
from unif2ace_jax.models.moe.token_moe import default_config as token_moe_default_config
from unif2ace_jax.models.unified import build_model, default_features
from unif2ace_jax.train.train import image_code_geometry

GROUPS = ("und", "gen")


@dataclasses.dataclass
class ParamSummary:
    """``rows``: module -> parameter count (ordered); ``active``: group -> active per token."""

    rows: "OrderedDict[str, int]"
    total: int
    active: dict[str, int]
    text_vocab_size: int
    vocab_size: int

    def table(self) -> str:
        labels = {g: f"active per token ({g}: {'T2I' if g == 'gen' else 'MMU/LM'})"
                  for g in GROUPS}
        width = max(len(k) for k in list(self.rows) + list(labels.values())) + 2
        lines = [f"{'module':<{width}}{'parameters':>16}{'share':>9}"]
        lines.append("-" * len(lines[0]))
        for name, count in self.rows.items():
            lines.append(f"{name:<{width}}{count:>16,}{100 * count / self.total:>8.2f}%")
        lines.append("-" * len(lines[0]))
        lines.append(f"{'total':<{width}}{self.total:>16,}  ({self.total / 1e9:.3f} B)")
        for g in GROUPS:
            n = self.active[g]
            lines.append(f"{labels[g]:<{width}}{n:>16,}  ({n / 1e9:.3f} B)")
        lines.append(f"vocabulary: {self.vocab_size:,} rows (text {self.text_vocab_size:,})")
        return "\n".join(lines)


def resolve_text_vocab_size(config: ml_collections.ConfigDict,
                            text_vocab_size: int | None = None) -> int:
    """The text vocabulary size to count with (see module docstring for the order)."""
    if text_vocab_size:
        return int(text_vocab_size)
    tok = config.get("data", {}).get("tokenizer", {})
    if int(tok.get("vocab_size", 0) or 0) > 0:
        return int(tok.vocab_size)
    path = tok.get("model_path", "") or ""
    if path and os.path.isfile(path):
        return int(make_text_tokenizer(tok.get("name", "sentencepiece"), path).vocab_size)
    assumed = int(config.get("assumed_text_vocab_size", 0) or 0)
    if assumed > 0:
        return assumed
    raise UserError("cannot tell the text vocabulary size: pass --text_vocab_size (the config "
                    "names no tokenizer size, no tokenizer file and no assumed_text_vocab_size)")


def _init_features(model_config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    extra = {}
    seq = model_config.get("seq_moe", None)
    if seq is not None and seq.get("name", "none") == "grouped_seq_moe":
        extra = dummy_features(seq, 1)
    extra = {k: v for k, v in extra.items() if k not in ("task", "mask_ratio")}
    return default_features(jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.float32), extra)


def abstract_params(config: ml_collections.ConfigDict, text_vocab_size: int) -> tuple[Any, Any]:
    """``(model, boxed abstract params)`` of ``config.model`` via `jax.eval_shape`."""
    m = config.model
    k, grid = int(m.get("num_image_codes", 0)), int(m.get("image_grid", 0))
    if k <= 0 or grid <= 0:
        k, grid = image_code_geometry(config)
    model = build_model(m, text_vocab_size=text_vocab_size, num_image_codes=k, image_grid=grid)
    features = _init_features(m)
    boxed = jax.eval_shape(lambda key: model.init(key, features=features)["params"],
                           jax.random.key(0))
    return model, boxed


def _keys(path) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def _split_first_axis(leaf, names: tuple, size: int, axis_name: str | None) -> list[int]:
    """Parameter counts of the ``size`` slices along the first non-``layers`` axis (or the
    axis named ``axis_name``)."""
    shape = tuple(leaf.shape)
    if axis_name is not None and axis_name in names:
        axis = names.index(axis_name)
    else:
        axis = next(i for i, n in enumerate(names) if n != "layers")
    if shape[axis] % size:
        raise ValueError(f"axis {axis} of {shape} does not split into {size}")
    return [int(np.prod(shape)) // size] * size


def summarize(config: ml_collections.ConfigDict, *,
              text_vocab_size: int | None = None) -> ParamSummary:
    """Counts ``config.model``'s parameters by module (no arrays are allocated)."""
    text_v = resolve_text_vocab_size(config, text_vocab_size)
    model, boxed = abstract_params(config, text_v)
    counter = _ParamCounter(config.model)
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for path, leaf in leaves:
        counter.add_leaf(path, leaf)
    return counter.summary(text_v, model.vocab.size)


class _ParamCounter:
    """Parameter counts by row, and per group the parameters a token of it leaves idle."""

    def __init__(self, model_config: ml_collections.ConfigDict):
        self.rows: "OrderedDict[str, int]" = OrderedDict(
            (k, 0) for k in ("token embedding", "attention", "layer norms", "FFN (dense)"))
        self.idle = {g: 0 for g in GROUPS}  # parameters a token of group g leaves unused
        self.seq_experts: dict[str, int] = {}
        ffn = model_config.ffn
        self.moe = ffn.get("name", "dense") == "token_moe"
        if self.moe:
            tcfg = token_moe_default_config()
            tcfg.update(ffn)
            self.num_routed, self.top_k = int(tcfg.num_routed), int(tcfg.top_k)
            for name in ("token-MoE router", "token-MoE shared (und)", "token-MoE shared (gen)",
                         "token-MoE routed (und)", "token-MoE routed (gen)"):
                self.rows[name] = 0
        self.seq = model_config.get("seq_moe", None)
        self.seq_on = self.seq is not None and self.seq.get("name", "none") != "none"
        if self.seq_on:
            self.rows["seq-MoE router"] = 0
            self.und, self.gen = tuple(self.seq.groups.und), tuple(self.seq.groups.gen)

    def add(self, row: str, n: int) -> None:
        self.rows[row] = self.rows.get(row, 0) + int(n)

    def add_leaf(self, path, leaf) -> None:
        names = tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else ()
        value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
        n = int(np.prod(value.shape))
        keys = _keys(path)
        inner = [k for k in keys if not k.startswith("layers")]
        top = keys[0]
        if top == "embed_tokens":
            self.add("token embedding", n)
        elif top == "lm_head":
            self.add("lm head", n)
        elif top == "final_layernorm" or (inner and inner[0].endswith("layernorm")):
            self.add("layer norms", n)
        elif inner and inner[0] == "self_attn":
            self.add("attention", n)
        elif inner and inner[0] == "mlp" and self.moe:
            self._add_token_moe(inner[-1], value, names, n)
        elif inner and inner[0] == "mlp":
            self.add("FFN (dense)", n)
        elif inner and inner[0] == "seq_moe" and self.seq_on:
            self._add_seq_moe(inner, n)
        else:
            self.add("other", n)

    def _add_token_moe(self, pname: str, value, names: tuple, n: int) -> None:
        if pname == "router":
            self.add("token-MoE router", n)
            for g in GROUPS:
                self.idle[g] += n // 2  # the other group's E columns
        elif pname.startswith("routed_"):
            halves = _split_first_axis(value, names, 2, "exp")
            for g, h in zip(GROUPS, halves):
                self.add(f"token-MoE routed ({g})", h)
            # own group: E - k of E experts idle; other group: all idle
            unpicked = self.num_routed - self.top_k
            self.idle["und"] += halves[1] + halves[0] * unpicked // self.num_routed
            self.idle["gen"] += halves[0] + halves[1] * unpicked // self.num_routed
        elif pname.startswith("shared_"):
            halves = _split_first_axis(value, names, 2, None)
            for g, h in zip(GROUPS, halves):
                self.add(f"token-MoE shared ({g})", h)
            self.idle["und"] += halves[1]
            self.idle["gen"] += halves[0]
        else:
            self.add("other", n)

    def _add_seq_moe(self, inner: list[str], n: int) -> None:
        if len(inner) >= 2 and inner[1] == "router":
            self.add("seq-MoE router", n)
            n_cols = len(self.und) + len(self.gen)
            self.idle["und"] += n * len(self.gen) // n_cols
            self.idle["gen"] += n * len(self.und) // n_cols
        elif len(inner) >= 2 and inner[1].startswith("expert_"):
            expert = inner[1][len("expert_"):]
            self.add(f"seq-MoE expert {expert}", n)
            self.seq_experts[expert] = self.seq_experts.get(expert, 0) + n
        else:
            self.add("other", n)

    def summary(self, text_vocab_size: int, vocab_size: int) -> ParamSummary:
        idle = dict(self.idle)
        if self.seq_on:
            k = int(self.seq.get("top_k", 2))
            for g, own in (("und", self.und), ("gen", self.gen)):
                counted = sorted((self.seq_experts.get(e, 0) for e in dict.fromkeys(own)),
                                 reverse=True)[:k]
                idle[g] += sum(self.seq_experts.values()) - sum(counted)
        rows = OrderedDict((k, v) for k, v in self.rows.items()
                           if v or k in ("token embedding", "attention"))
        total = sum(rows.values())
        return ParamSummary(rows=rows, total=total, active={g: total - idle[g] for g in GROUPS},
                            text_vocab_size=text_vocab_size, vocab_size=vocab_size)


def main(argv: list[str]) -> None:
    cli.no_positional(argv)
    config = cli.require_config(_CONFIG, "configs/unif2ace_1p8b.py")
    summary = summarize(config, text_vocab_size=flags.FLAGS.text_vocab_size)
    print(summary.table())


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Model config file.",
                                              lock_config=True)
    flags.DEFINE_integer("text_vocab_size", None,
                         "Text vocabulary size (default: from the config / its tokenizer).")
    run_cli(main)
