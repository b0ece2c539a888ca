"""Routing diagnostics of the MoE layers: which experts the tokens and sequences use, per layer.

Runs the model over evaluation batches of T2I rows (gen group; image codes masked as in
training, mask ratio from the training schedule) and MMU rows (und group), with the
``intermediates`` collection mutable, and reads what the MoE modules sow:

* token-level MoE (``expert_counts [2E]`` per layer): the fraction of the group's routed token
  copies that each of its E experts received (each row sums to 1; uniform = 1/E);
* sequence-level MoE (``seq_moe_usage [N]`` per layer): the fraction of the group's sequences
  that picked each of its router columns (each row sums to top_k; columns by expert name).

`routing_diagnostics` returns these numbers (JSON-ready, merged into ``evaluate``'s output under
``"routing"``) and draws them as heatmaps, layers x experts, one panel per MoE and group, like
the paper's expert-activation figure (PNG, drawn with PIL).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from unif2ace_jax.data import pipeline
from unif2ace_jax.evaluate.batches import eval_batches
from unif2ace_jax.losses.unified import model_inputs, prepare_inputs
from unif2ace_jax.models.masks import omni_attention_mask
from unif2ace_jax.models.moe import seq_moe as seq_moe_lib
from unif2ace_jax.models.moe import token_moe
from unif2ace_jax.models.moe.seq_routing import prompt_pool_mask
from unif2ace_jax.models.sequences import TASK_T2I
from unif2ace_jax.models.unified import UnifiedModel
from unif2ace_jax.utils.defaults import with_defaults

GROUPS = ("und", "gen")


def has_moe(model: UnifiedModel) -> bool:
    """True when the model has a token-level or a sequence-level MoE."""
    bb = model.backbone
    return bb.ffn.name == "token_moe" or bb.seq_moe.name != "none"


def _per_layer(tree: Mapping[str, Any], leaf_name: str) -> np.ndarray | None:
    """The sown value ``leaf_name`` stacked over layers ``[num_layers, ...]`` (scanned or not)."""
    found: dict[int, np.ndarray] = {}
    scanned = None
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        keys = [str(getattr(p, "key", "")) for p in path]
        if leaf_name not in keys:
            continue
        layer = next((k for k in keys if k.startswith("layers")), None)
        if layer == "layers":
            scanned = np.asarray(leaf)
        elif layer is not None:
            found[int(layer.split("_")[1])] = np.asarray(leaf)
    if scanned is not None:
        return scanned
    if found:
        return np.stack([found[i] for i in sorted(found)])
    return None


def routing_intermediates(model: UnifiedModel, params: Any, seqs: Mapping[str, jax.Array],
                          features: Mapping[str, jax.Array] | None) -> dict[str, Any]:
    """One backbone pass returning the ``intermediates`` collection (router statistics)."""
    if model.backbone.seq_moe.name != "none" and not (
            features and "pool_mask" in features):
        features = dict(features or {}, pool_mask=prompt_pool_mask(
            seqs["valid"], seqs.get("target_weights")))
    mask = omni_attention_mask(seqs["is_pad"], seqs["image_span"])
    _, state = model.backbone.apply(
        {"params": params}, seqs["tokens"], mask=mask, positions=seqs["positions"],
        group=seqs["group"], valid=seqs["valid"], features=features, return_hidden=True,
        mutable=["intermediates"])
    return state["intermediates"]


class RoutingCounter:
    """Accumulates expert usage over batches (host side)."""

    def __init__(self, model: UnifiedModel):
        self.model = model
        self.token_counts: np.ndarray | None = None  # [layers, 2E]
        self.seq_usage: np.ndarray | None = None  # [layers, N]
        self.num_sequences = {g: 0 for g in GROUPS}

    def add(self, intermediates: Mapping[str, Any], seq_group: np.ndarray,
            seq_valid: np.ndarray) -> None:
        """``seq_group [B]`` (0 und, 1 gen) and ``seq_valid [B]`` of the batch just run."""
        counts = _per_layer(intermediates, "expert_counts")
        if counts is not None:
            counts = counts.reshape(counts.shape[0], -1).astype(np.int64)
            self.token_counts = counts if self.token_counts is None else self.token_counts + counts
        usage = _per_layer(intermediates, "seq_moe_usage")
        if usage is not None:
            usage = usage.reshape(usage.shape[0], -1).astype(np.float64)
            self.seq_usage = usage if self.seq_usage is None else self.seq_usage + usage
        for g, name in enumerate(GROUPS):
            self.num_sequences[name] += int(np.sum((seq_group == g) & seq_valid))

    def result(self) -> dict[str, Any]:
        """JSON-ready statistics (see module docstring)."""
        out: dict[str, Any] = {"num_sequences": dict(self.num_sequences)}
        bb = self.model.backbone
        if self.token_counts is not None:
            e = self.token_counts.shape[1] // 2
            ffn = with_defaults(token_moe.default_config(), bb.ffn, "model.ffn")
            token = {"experts_per_group": e, "top_k": int(ffn.top_k)}
            for g, name in enumerate(GROUPS):
                part = self.token_counts[:, g * e:(g + 1) * e].astype(np.float64)
                total = part.sum(axis=1, keepdims=True)
                token[name] = np.where(total > 0, part / np.maximum(total, 1), 0.0).tolist()
                token[f"{name}_copies"] = int(part.sum())
            out["token_moe"] = token
        if self.seq_usage is not None:
            und, gen = tuple(bb.seq_moe.groups.und), tuple(bb.seq_moe.groups.gen)
            seq: dict[str, Any] = {"top_k": int(seq_moe_lib.full_config(bb.seq_moe).top_k)}
            for name, cols, lo in (("und", und, 0), ("gen", gen, len(und))):
                n = max(self.num_sequences[name], 1)
                seq[name] = {"experts": list(cols),
                             "pick_fraction": (self.seq_usage[:, lo:lo + len(cols)] / n).tolist()}
            out["seq_moe"] = seq
        return out


def _panels(stats: Mapping[str, Any]) -> list[tuple[str, np.ndarray, list[str]]]:
    panels = []
    token = stats.get("token_moe")
    if token:
        for g in GROUPS:
            m = np.asarray(token[g])
            panels.append((f"token MoE, {g} group: share of routed tokens", m,
                           [f"e{i}" for i in range(m.shape[1])]))
    seq = stats.get("seq_moe")
    if seq:
        for g in GROUPS:
            m = np.asarray(seq[g]["pick_fraction"])
            panels.append((f"sequence MoE, {g} group: share of sequences", m,
                           list(seq[g]["experts"])))
    return panels


def draw_routing_figure(stats: Mapping[str, Any], path: str, *, title: str = "") -> str:
    """Heatmaps (rows: layers, columns: experts; darker = used more, value printed in the cell)
    of every panel of `stats` (`RoutingCounter.result`), saved as a PNG at `path`."""
    panels = _panels(stats)
    font = ImageFont.load_default()
    cell_w, cell_h, left, top_pad, gap = 44, 18, 56, 34, 24
    widths = [left + cell_w * m.shape[1] for _, m, _ in panels] or [200]
    heights = [top_pad + cell_h * (m.shape[0] + 1) for _, m, _ in panels] or [40]
    width = max(max(widths), 420) + 20
    height = 30 + sum(h + gap for h in heights)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title or "expert activation per layer", fill="black", font=font)
    y = 30
    for (name, m, cols), h in zip(panels, heights):
        draw.text((10, y), name, fill="black", font=font)
        vmax = max(float(m.max()) if m.size else 0.0, 1e-9)
        y0 = y + top_pad - cell_h
        for j, col in enumerate(cols):
            draw.text((left + j * cell_w + 4, y0 + 3), col[:7], fill="black", font=font)
        for i in range(m.shape[0]):
            yy = y + top_pad + i * cell_h
            draw.text((10, yy + 3), f"layer {i}", fill="black", font=font)
            for j in range(m.shape[1]):
                v = float(m[i, j])
                shade = int(255 - 200 * min(v / vmax, 1.0))
                x = left + j * cell_w
                draw.rectangle([x, yy, x + cell_w - 2, yy + cell_h - 2],
                               fill=(shade, shade, 255))
                draw.text((x + 4, yy + 3), f"{v:.2f}", fill="black" if shade > 110 else "white",
                          font=font)
        y += h + gap
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


def collect_routing(model: UnifiedModel, params: Any, batches: Iterable[Mapping[str, Any]],
                    loss_cfg: ml_collections.ConfigDict, *, seed: int = 0,
                    extra_fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """Routing statistics over raw batches (`data.pipeline` contract) of any tasks.

    T2I rows get their codes masked as in training (`losses.unified.prepare_inputs`, no caption
    dropout), so the gen group is seen at the noise levels it is trained on.
    """
    @jax.jit
    def run(params, batch, rng):
        inputs = prepare_inputs(model, batch, rng, loss_cfg, train=False,
                                extra_fields=extra_fields)
        seqs = inputs["seqs"]
        # Padding rows of the last eval batch route too; keep them out of the counts.
        seqs = dict(seqs, valid=seqs["valid"] & inputs["valid"][:, None])
        return routing_intermediates(model, params, seqs, inputs["features"])

    counter = RoutingCounter(model)
    for b, batch in enumerate(batches):
        inputs = model_inputs(batch, extra_fields)
        inter = run(params, inputs, jax.random.fold_in(jax.random.key(seed), b))
        task = np.asarray(batch["task"])
        valid = np.asarray(inputs["valid"], bool)
        counter.add(jax.device_get(inter), (task == TASK_T2I).astype(np.int32), valid)
    return counter.result()


def routing_diagnostics(trained, split: str, *, max_sequences: int = 64, batch_size: int = 32,
                        seed: int = 0, figure_path: str | None = None) -> dict[str, Any]:
    """Routing statistics of a trained run on `split` (T2I and MMU rows, up to `max_sequences`
    of each), with the figure written to `figure_path` (default
    ``<workdir>/routing_<split>_step<step>.png``). Returns the JSON-ready dict (with
    ``"figure"``: the PNG's path)."""
    extra_fields = tuple(pipeline.full_config(trained.config.data).extra_fields)
    loss_cfg = ml_collections.ConfigDict(trained.config.loss.to_dict())

    def take(task: str):
        seen = 0
        for batch in eval_batches(trained, split, task, "image_codes", batch_size):
            valid = np.array(batch["valid"], bool)
            valid &= np.cumsum(valid) + seen <= max_sequences
            if not valid.any():
                return
            seen += int(valid.sum())
            yield dict(batch, valid=valid)
            if seen >= max_sequences:
                return

    def batches():
        yield from take("t2i")
        yield from take("mmu")

    stats = collect_routing(trained.model, trained.params, batches(), loss_cfg, seed=seed,
                            extra_fields=extra_fields)
    path = figure_path or os.path.join(trained.workdir, f"routing_{split}_step{trained.step}.png")
    stats["figure"] = draw_routing_figure(
        stats, path, title=f"expert activation, {split}, step {trained.step}")
    return stats
