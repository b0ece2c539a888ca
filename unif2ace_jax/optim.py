"""Optimizer from config: AdamW, linear warm-up + cosine decay, gradient clipping, accumulation.

Config section `config.optim`::

    lr: peak learning rate             warmup_steps: linear warm-up length
    end_lr_factor: final lr / peak     b1, b2, eps: AdamW moments
    weight_decay: decoupled decay (not applied to biases, norms and 1-d params)
    grad_clip: global-norm clip (0 = off)
    accumulation_steps: micro-batches per update (1 = off; optax.MultiSteps)

Show-o's defaults (DESIGN §12): betas (0.9, 0.999), eps 1e-8, weight decay 0.01, cosine schedule.
"""

from __future__ import annotations

import jax
import ml_collections
import optax


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `optim.lr`, then cosine decay to `lr * end_lr_factor`."""
    warmup = min(int(optim.get("warmup_steps", 0)), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim.lr * optim.get("end_lr_factor", 0.0),
    )


def _decay_mask(params):
    """Weight decay only on matrices and conv kernels (ndim >= 2)."""
    return jax.tree.map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(optim, total_steps)
    chain = []
    if optim.get("grad_clip", 0.0):
        chain.append(optax.clip_by_global_norm(optim.grad_clip))
    chain.append(optax.adamw(
        learning_rate=schedule,
        b1=optim.get("b1", 0.9),
        b2=optim.get("b2", 0.999),
        eps=optim.get("eps", 1e-8),
        weight_decay=optim.get("weight_decay", 0.0),
        mask=_decay_mask,
    ))
    tx = optax.chain(*chain)
    accumulation = int(optim.get("accumulation_steps", 1))
    if accumulation > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulation)
    return tx, schedule
