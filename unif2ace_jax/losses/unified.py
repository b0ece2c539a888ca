"""The unified training objective on one raw batch (docs/DESIGN.md §2, §6):

    loss = w_t2i * L_D3Diff + w_mmu * L_mmu + w_lm * L_lm + sum(MoE aux losses)

Steps, all inside one jitted function:

1. T2I rows get their image codes masked (Show-o's exact-count masking, cosine schedule by
   default; `sampling.masking.mask_exact_count`, whose realised fraction is the mask ratio given
   to the loss); MMU rows keep clean codes; LM rows have no image.
2. `build_sequences` lays out the mixed T2I / MMU / LM rows (caption dropout for CFG).
3. One backbone pass; image logits at the N image positions over the K codes only; text logits
   over the whole vocabulary.
4. ``L_D3Diff`` (`losses.d3diff_loss`) over T2I rows, ``L_mmu`` / ``L_lm`` (`losses.next_token_loss`)
   over the answer tokens of MMU rows / the text of LM rows.

Each term is a mean over the *global* batch (one masked-token mean for L_mask, one per-row mean
for L_score, one weighted token mean per text task), so a data-parallel step equals the
single-device step. Rows with ``valid == False`` (eval padding) count nowhere.

`config.loss` fields: ``w_t2i, w_mmu, w_lm`` (1, 1, 0.1), ``alpha`` (0.01), ``mask_weight`` (1;
0 = "only score"), ``schedule`` ("cosine"), ``score_parameterization`` ("free"),
``cond_dropout`` (0.1), ``masking`` ("count" | "independent").
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from unif2ace_jax.diffusion.d3diff import d3diff_loss
from unif2ace_jax.losses.next_token import next_token_loss
from unif2ace_jax.models.sequences import TASK_LM, TASK_MMU, TASK_T2I
from unif2ace_jax.models.unified import UnifiedModel, default_features
from unif2ace_jax.diffusion.masking import mask_image_codes
from unif2ace_jax.utils.defaults import with_defaults

# Keys of a raw batch that the objective reads (the rest, e.g. decoded images, stays on host).
MODEL_KEYS = ("task", "text", "text_len", "answer", "answer_len", "text_targets",
              "image_codes", "valid")


def default_config() -> ml_collections.ConfigDict:
    """Every field of ``config.loss`` (read by `unified_loss`), with the paper's / Show-o's
    values."""
    return ml_collections.ConfigDict(dict(
        w_t2i=1.0, w_mmu=1.0, w_lm=0.1, alpha=0.01, mask_weight=1.0, schedule="cosine",
        score_parameterization="free", cond_dropout=0.1, masking="count"))


def full_loss_config(loss_cfg) -> ml_collections.ConfigDict:
    """``config.loss``: `default_config` updated with `loss_cfg` (unknown fields refused)."""
    return with_defaults(default_config(), loss_cfg, "loss")


def model_inputs(batch: Mapping[str, Any], extra_fields: tuple[str, ...] = ()) -> dict:
    """The subset of a raw batch that goes to the device (see `MODEL_KEYS`)."""
    out = {k: batch[k] for k in MODEL_KEYS if k in batch}
    if "valid" not in out:
        out["valid"] = jnp.ones(batch["task"].shape, bool)
    for name in extra_fields:
        out[name] = batch[name]
        if f"{name}_present" in batch:
            out[f"{name}_present"] = batch[f"{name}_present"]
    return out


def record_features(batch: Mapping[str, Any], extra_fields: tuple[str, ...],
                    task: jax.Array) -> dict[str, jax.Array]:
    """The records' feature fields of a batch for the seq-MoE (``features`` entries).

    Each name of `extra_fields` present in `batch` (``[B, ...]``) comes with
    ``<name>_present [B] bool``: the batch's own mask (True when absent) and False on LM rows,
    whose text is not about the record's image, so the router cannot pick a feature expert
    there. ``task: [B] int``.
    """
    out: dict[str, jax.Array] = {}
    not_lm = jnp.asarray(task) != TASK_LM
    for name in extra_fields:
        if name not in batch:
            continue
        out[name] = batch[name]
        present = batch.get(f"{name}_present")
        present = not_lm if present is None else jnp.asarray(present, bool) & not_lm
        out[f"{name}_present"] = present
    return out


def mask_t2i_codes(rng: jax.Array, codes: jax.Array, is_t2i: jax.Array, *, mask_id: int,
                   schedule: str = "cosine", mode: str = "count"
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Masks the codes of T2I rows only.

    Args:
      codes: ``[B, N]`` int in ``[0, K)``; is_t2i: ``[B]`` bool; mask_id: K.
    Returns ``(codes_in [B, N], masked [B, N] bool, mask_ratio [B])``; rows that are not T2I keep
    their codes and have no masked place (their ratio is whatever was drawn; it is not used).
    """
    masked_codes, masked, ratio = mask_image_codes(rng, codes, mask_id=mask_id,
                                                   schedule=schedule, mode=mode)
    masked = masked & is_t2i[:, None]
    return jnp.where(masked, masked_codes, codes), masked, ratio


def prepare_inputs(model: UnifiedModel, batch: Mapping[str, jax.Array], rng: jax.Array,
                   loss_cfg: ml_collections.ConfigDict, *, train: bool = True,
                   extra_fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """The random part of the objective: masks T2I codes, builds sequences and features.

    Returns ``seqs`` (`build_sequences` output), ``features``, ``codes [B, N]`` (clean targets),
    ``masked [B, N]``, ``mask_ratio [B]``, ``is_t2i [B]`` (T2I and valid), ``valid [B]``,
    ``task [B]`` and ``dropout_rng`` (None when dropout is off).
    """
    loss_cfg = full_loss_config(loss_cfg)
    k_mask, k_drop, k_dropout = jax.random.split(rng, 3)
    task = jnp.asarray(batch["task"], jnp.int32)
    valid = jnp.asarray(batch.get("valid", jnp.ones(task.shape, bool)), bool)
    codes = jnp.asarray(batch["image_codes"], jnp.int32)
    is_t2i = (task == TASK_T2I) & valid
    codes_in, masked, ratio = mask_t2i_codes(
        k_mask, codes, is_t2i, mask_id=model.num_image_codes,
        schedule=loss_cfg.schedule, mode=loss_cfg.masking)
    cond_dropout = float(loss_cfg.cond_dropout) if train else 0.0
    seqs = model.sequences(dict(batch, image_codes=codes_in), rng=k_drop,
                           cond_dropout=cond_dropout)
    features = default_features(task, jnp.where(is_t2i, ratio, 0.0),
                                record_features(batch, extra_fields, task))
    dropout_rng = k_dropout if train and model.backbone.dropout_rate > 0 else None
    return {"seqs": seqs, "features": features, "codes": codes, "masked": masked,
            "mask_ratio": ratio, "is_t2i": is_t2i, "valid": valid, "task": task,
            "dropout_rng": dropout_rng}


def loss_from_inputs(model: UnifiedModel, params: Any, inputs: Mapping[str, Any],
                     loss_cfg: ml_collections.ConfigDict
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The deterministic part: forward pass and the weighted sum of the losses."""
    loss_cfg = full_loss_config(loss_cfg)
    seqs, task, valid = inputs["seqs"], inputs["task"], inputs["valid"]
    hidden, aux_parts = model.forward(params, seqs, features=inputs["features"],
                                      dropout_rng=inputs["dropout_rng"], aux_parts=True)
    aux_loss = sum(aux_parts.values(), jnp.zeros((), jnp.float32))

    img_logits = model.image_logits(params, hidden, seqs["image_positions"])
    t2i_loss, d3 = d3diff_loss(
        img_logits, inputs["codes"], inputs["masked"], inputs["mask_ratio"],
        alpha=float(loss_cfg.alpha), schedule=loss_cfg.schedule,
        score_parameterization=loss_cfg.score_parameterization,
        mask_weight=float(loss_cfg.mask_weight), example_mask=inputs["is_t2i"])

    logits = model.text_logits(params, hidden)
    weights = seqs["target_weights"] * valid[:, None].astype(jnp.float32)
    mmu_w = weights * (task == TASK_MMU)[:, None]
    lm_w = weights * (task == TASK_LM)[:, None]
    mmu_loss, mmu = next_token_loss(logits, seqs["targets"], mmu_w)
    lm_loss, lm = next_token_loss(logits, seqs["targets"], lm_w)

    loss = (float(loss_cfg.w_t2i) * t2i_loss
            + float(loss_cfg.w_mmu) * mmu_loss
            + float(loss_cfg.w_lm) * lm_loss + aux_loss)
    metrics = {
        "loss": loss, "t2i_loss": t2i_loss, "mask_ce": d3["mask_ce"],
        "score_entropy": d3["score_entropy"], "nelbo_bits_per_token": d3["nelbo_bits_per_token"],
        "mask_accuracy": d3["mask_accuracy"], "num_masked": d3["num_masked"],
        "mmu_loss": mmu_loss, "mmu_accuracy": mmu["accuracy"], "num_mmu_tokens": mmu["num_tokens"],
        "lm_loss": lm_loss, "num_lm_tokens": lm["num_tokens"], "aux_loss": aux_loss,
        **{f"aux/{name}": value for name, value in aux_parts.items()},
    }
    return loss, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def unified_loss(model: UnifiedModel, params: Any, batch: Mapping[str, jax.Array],
                 rng: jax.Array, loss_cfg: ml_collections.ConfigDict, *,
                 train: bool = True, extra_fields: tuple[str, ...] = ()
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and metrics of one raw batch (`prepare_inputs` then `loss_from_inputs`).

    Args:
      model: the unified model; params: its unboxed params.
      batch: raw batch arrays (`data.pipeline` contract): ``task [B]``, ``text [B, Lt]``,
        ``text_len``, ``answer [B, La]``, ``answer_len``, ``image_codes [B, N]``, ``valid [B]``
        and the feature fields named in `extra_fields`.
      rng: key for masking, caption dropout and dropout (dropout only when ``train``).
      loss_cfg: ``config.loss`` (see module docstring).
      train: applies caption dropout and dropout; False gives the deterministic evaluation loss.

    Returns ``(loss, metrics)``; metrics are float32 scalars: ``loss, t2i_loss, mask_ce,
    score_entropy, nelbo_bits_per_token, mask_accuracy, mmu_loss, mmu_accuracy, lm_loss,
    aux_loss`` (each MoE part also as ``aux/<name>``, e.g. ``aux/balance_gen``, ``aux/router_z``,
    ``aux/seq_moe_balance``, already weighted) and the counts ``num_masked, num_mmu_tokens,
    num_lm_tokens``.
    """
    inputs = prepare_inputs(model, batch, rng, loss_cfg, train=train, extra_fields=extra_fields)
    return loss_from_inputs(model, params, inputs, loss_cfg)
