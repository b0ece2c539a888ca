"""Optimizer from config: AdamW, linear warm-up + cosine decay, gradient clipping, accumulation.

Config section `config.optim`::

    lr: peak learning rate             warmup_steps: linear warm-up length
    end_lr_factor: final lr / peak     b1, b2, eps: AdamW moments
    weight_decay: decoupled decay (not applied to biases, norms and 1-d params)
    grad_clip: global-norm clip (0 = off)
    accumulation_steps: micro-batches per update (1 = off; optax.MultiSteps)

Show-o's defaults (docs/DESIGN.md §12): betas (0.9, 0.999), eps 1e-8, weight decay 0.01, cosine schedule.
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from unif2ace_jax.errors import UserError
from unif2ace_jax.utils.defaults import with_defaults


def default_config() -> ml_collections.ConfigDict:
    """Every field of an optimizer section (``config.optim``), with its default; ``lr`` has
    none (it must be given)."""
    return ml_collections.ConfigDict(dict(
        lr=None, warmup_steps=0, end_lr_factor=0.0, b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=0.0, grad_clip=0.0, accumulation_steps=1))


def full_config(optim, where: str = "optim") -> ml_collections.ConfigDict:
    """`default_config` updated with `optim` (unknown fields refused; ``lr`` required)."""
    full = with_defaults(default_config(), optim, where)
    if full.lr is None:
        raise UserError(f"{where}.lr is required")
    return full


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `optim.lr`, then cosine decay to `lr * end_lr_factor`."""
    optim = full_config(optim)
    warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim.lr * optim.end_lr_factor,
    )


def _decay_mask(params):
    """Weight decay only on matrices and conv kernels (ndim >= 2)."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    optim = full_config(optim)
    schedule = make_schedule(optim, total_steps)
    chain = []
    if optim.grad_clip:
        chain.append(optax.clip_by_global_norm(optim.grad_clip))
    chain.append(optax.adamw(
        learning_rate=schedule,
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=_decay_mask,
    ))
    tx = optax.chain(*chain)
    accumulation = int(optim.accumulation_steps)
    if accumulation > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulation)
    return tx, schedule
