"""Named rematerialisation (activation checkpointing) policies for the backbone's layers.

Names used by `jax.ad_checkpoint.checkpoint_name` inside a layer:
``query_proj, key_proj, value_proj`` (attention projections, after bias), ``context``
(attention output before ``dense``), ``attn_out`` (after ``dense``), ``mlp_out`` (FFN slot
output).

Policies (``config.model.remat_policy``):

* ``none`` — no remat; the backward pass keeps every activation (fastest, most memory).
* ``full`` — save nothing inside a layer; recompute the whole layer in the backward pass.
* ``dots_saveable`` — save all matmul outputs (`jax.checkpoint_policies.dots_saveable`).
* ``dots_with_no_batch_dims_saveable`` — save matmuls without batch dims (the projections, not
  the attention score / context einsums).
* ``save_qkv_proj`` — save only the q/k/v projections.
* ``save_qkv_context`` — save q/k/v and the attention context.
* ``save_block_outputs`` — save the attention and FFN outputs (``attn_out``, ``mlp_out``).
"""

from __future__ import annotations

from typing import Callable

import jax

from unif2ace_jax.errors import UserError

CHECKPOINT_NAMES = ("query_proj", "key_proj", "value_proj", "context", "attn_out", "mlp_out")

_cp = jax.checkpoint_policies

_POLICIES: dict[str, Callable | None] = {
    "full": _cp.nothing_saveable,
    "dots_saveable": _cp.dots_saveable,
    "dots_with_no_batch_dims_saveable": _cp.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": _cp.save_only_these_names("query_proj", "key_proj", "value_proj"),
    "save_qkv_context": _cp.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "context"),
    "save_block_outputs": _cp.save_only_these_names("attn_out", "mlp_out"),
}

REMAT_POLICIES: tuple[str, ...] = ("none",) + tuple(_POLICIES)


def remat_policy(name: str) -> Callable | None:
    """The `jax.checkpoint` policy for ``name``; None for ``"none"`` (no remat at all)."""
    if name == "none":
        return None
    try:
        return _POLICIES[name]
    except KeyError:
        raise UserError(
            f"unknown remat_policy {name!r}; known: {', '.join(REMAT_POLICIES)}") from None
