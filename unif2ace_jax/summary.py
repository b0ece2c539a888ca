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

from unif2ace_jax.errors import UserError

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
        from unif2ace_jax.data.text_tokenizer import make_text_tokenizer

        return int(make_text_tokenizer(tok.get("name", "sentencepiece"), path).vocab_size)
    assumed = int(config.get("assumed_text_vocab_size", 0) or 0)
    if assumed > 0:
        return assumed
    raise UserError("cannot tell the text vocabulary size: pass --text_vocab_size (the config "
                    "names no tokenizer size, no tokenizer file and no assumed_text_vocab_size)")


def _init_features(model_config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    from unif2ace_jax.models.unified import default_features

    extra = {}
    seq = model_config.get("seq_moe", None)
    if seq is not None and seq.get("name", "none") == "grouped_seq_moe":
        from unif2ace_jax.models.moe.seq_moe import dummy_features

        extra = dummy_features(seq, 1)
    extra = {k: v for k, v in extra.items() if k not in ("task", "mask_ratio")}
    return default_features(jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.float32), extra)


def abstract_params(config: ml_collections.ConfigDict, text_vocab_size: int) -> tuple[Any, Any]:
    """``(model, boxed abstract params)`` of ``config.model`` via `jax.eval_shape`."""
    from unif2ace_jax.models.unified import build_model

    m = config.model
    k, grid = int(m.get("num_image_codes", 0)), int(m.get("image_grid", 0))
    if k <= 0 or grid <= 0:
        from unif2ace_jax.train.train import image_code_geometry

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
    rows: "OrderedDict[str, int]" = OrderedDict(
        (k, 0) for k in ("token embedding", "attention", "layer norms", "FFN (dense)"))
    idle = {g: 0 for g in GROUPS}  # parameters a token of group g leaves unused
    seq_experts: dict[str, int] = {}

    ffn = config.model.ffn
    moe = ffn.get("name", "dense") == "token_moe"
    if moe:
        from unif2ace_jax.models.moe.token_moe import default_config

        tcfg = default_config()
        tcfg.update(ffn)
        num_routed, top_k = int(tcfg.num_routed), int(tcfg.top_k)
        for name in ("token-MoE router", "token-MoE shared (und)", "token-MoE shared (gen)",
                     "token-MoE routed (und)", "token-MoE routed (gen)"):
            rows[name] = 0
    seq = config.model.get("seq_moe", None)
    seq_on = seq is not None and seq.get("name", "none") != "none"
    if seq_on:
        rows["seq-MoE router"] = 0
        und, gen = tuple(seq.groups.und), tuple(seq.groups.gen)
        n_cols = len(und) + len(gen)

    def add(row: str, n: int) -> None:
        rows[row] = rows.get(row, 0) + int(n)

    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for path, leaf in leaves:
        names = tuple(leaf.names) if isinstance(leaf, nn.LogicallyPartitioned) else ()
        value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
        n = int(np.prod(value.shape))
        keys = _keys(path)
        inner = [k for k in keys if not k.startswith("layers")]
        top = keys[0]
        if top == "embed_tokens":
            add("token embedding", n)
        elif top == "lm_head":
            add("lm head", n)
        elif top == "final_layernorm" or (inner and inner[0].endswith("layernorm")):
            add("layer norms", n)
        elif inner and inner[0] == "self_attn":
            add("attention", n)
        elif inner and inner[0] == "mlp" and moe:
            pname = inner[-1]
            if pname == "router":
                add("token-MoE router", n)
                for g in GROUPS:
                    idle[g] += n // 2  # the other group's E columns
            elif pname.startswith("routed_"):
                halves = _split_first_axis(value, names, 2, "exp")
                for g, h in zip(GROUPS, halves):
                    add(f"token-MoE routed ({g})", h)
                # own group: E - k of E experts idle; other group: all idle
                idle["und"] += halves[1] + halves[0] * (num_routed - top_k) // num_routed
                idle["gen"] += halves[0] + halves[1] * (num_routed - top_k) // num_routed
            elif pname.startswith("shared_"):
                halves = _split_first_axis(value, names, 2, None)
                for g, h in zip(GROUPS, halves):
                    add(f"token-MoE shared ({g})", h)
                idle["und"] += halves[1]
                idle["gen"] += halves[0]
            else:
                add("other", n)
        elif inner and inner[0] == "mlp":
            add("FFN (dense)", n)
        elif inner and inner[0] == "seq_moe" and seq_on:
            if len(inner) >= 2 and inner[1] == "router":
                add("seq-MoE router", n)
                idle["und"] += n * len(gen) // n_cols
                idle["gen"] += n * len(und) // n_cols
            elif len(inner) >= 2 and inner[1].startswith("expert_"):
                expert = inner[1][len("expert_"):]
                add(f"seq-MoE expert {expert}", n)
                seq_experts[expert] = seq_experts.get(expert, 0) + n
            else:
                add("other", n)
        else:
            add("other", n)

    if seq_on:
        k = int(seq.get("top_k", 2))
        for g, own in (("und", und), ("gen", gen)):
            counted = sorted((seq_experts.get(e, 0) for e in dict.fromkeys(own)),
                             reverse=True)[:k]
            idle[g] += sum(seq_experts.values()) - sum(counted)
    rows = OrderedDict((k, v) for k, v in rows.items() if v or k in ("token embedding",
                                                                      "attention"))
    total = sum(rows.values())
    return ParamSummary(rows=rows, total=total, active={g: total - idle[g] for g in GROUPS},
                        text_vocab_size=text_v, vocab_size=model.vocab.size)


def main(argv: list[str]) -> None:
    from absl import flags

    from unif2ace_jax import cli

    cli.no_positional(argv)
    config = cli.require_config(_CONFIG, "configs/unif2ace_1p8b.py")
    summary = summarize(config, text_vocab_size=flags.FLAGS.text_vocab_size)
    print(summary.table())


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from unif2ace_jax.errors import run_cli

    _CONFIG = config_flags.DEFINE_config_file("config", None, "Model config file.",
                                              lock_config=True)
    flags.DEFINE_integer("text_vocab_size", None,
                         "Text vocabulary size (default: from the config / its tokenizer).")
    run_cli(main)
