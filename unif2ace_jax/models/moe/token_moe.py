"""Token-level grouped MoE (docs/DESIGN.md §4) in the backbone's FFN slot, registered as "token_moe".

Two expert groups, und (``group == 0``) and gen (``group == 1``), stored as one layer:

* routed experts: ``2E`` experts ``wi [2E, d, h]``, ``wo [2E, h, d]`` (logical axes
  ``("exp", "embed", "mlp")`` / ``("exp", "mlp", "embed")``); experts ``[0, E)`` are und,
  ``[E, 2E)`` gen. The router (float32 always) scores all 2E, masks the other group's
  logits, and picks top-k of the group's softmax (`routing.py`).
* shared experts: always on, one FFN per group of width ``num_shared * shared_hidden``
  (``num_shared`` experts of width ``shared_hidden`` summed equal one expert with their
  hidden units concatenated; their output biases merge into one). They are dispatched
  dropless by group (a top-1 "routing" on the group id with weight 1), so each token pays
  for its own group's shared expert only.

Pad tokens (``valid`` False) take no routed slot and get only the shared experts' output;
they are left out of every loss. The group assignment policy (task or modality) belongs to
the caller. Losses are sown, already weighted, in the "aux_loss" collection:
``balance_und``, ``balance_gen`` (Switch load balance of each group) and ``router_z``;
the "intermediates" collection gets ``expert_counts [2E]`` (kept copies per expert) and,
in capacity mode, ``dropped_fraction`` (of valid copies).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.ffn import FFN_SLOTS
from unif2ace_jax.models.moe import dispatch as dispatch_lib
from unif2ace_jax.models.moe import routing

DISPATCH_MODES = ("ragged", "capacity")
GROUPED_MATMULS = ("auto",) + dispatch_lib.RAGGED_IMPLS


def default_config() -> ml_collections.ConfigDict:
    """Every field the "token_moe" factory reads, with its default."""
    return ml_collections.ConfigDict(dict(
        name="token_moe",
        num_routed=8,          # routed experts per group (E)
        num_shared=1,          # shared experts per group
        top_k=4,
        routed_hidden=1024,
        shared_hidden=8192,
        dispatch="ragged",     # ragged (dropless) | capacity
        capacity_factor=1.25,  # capacity mode: C = ceil(cf * B * L * k / (2E)) (compute_capacity)
        capacity_method="gather",  # capacity mode: gather | einsum (one-hot [T, 2E, C])
        grouped_matmul="auto",     # ragged mode: auto | ragged_dot | blocked (auto: blocked on CPU)
        block_size=128,        # rows per block of the blocked grouped matmul
        renormalize=True,      # top-k weights renormalised to sum to 1
        balance_weight_gen=0.01,
        balance_weight_und=0.01,
        z_loss_weight=1e-3,
        use_bias=True,
    ))


class TokenMoE(nn.Module):
    """Token MoE. ``x: [B, L, D]``, ``group: [B, L] int32`` (0 und, 1 gen),
    ``valid: [B, L] bool`` (None: all valid) -> ``[B, L, D]`` in ``dtype``."""

    num_routed: int = 8
    num_shared: int = 1
    top_k: int = 4
    routed_hidden: int = 1024
    shared_hidden: int = 8192
    dispatch: str = "ragged"
    capacity_factor: float = 1.25
    capacity_method: str = "gather"
    grouped_matmul: str = "auto"
    block_size: int = 128
    renormalize: bool = True
    balance_weight_gen: float = 0.01
    balance_weight_und: float = 0.01
    z_loss_weight: float = 1e-3
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _ragged_impl(self) -> str:
        if self.grouped_matmul != "auto":
            return self.grouped_matmul
        return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"

    def _experts(self, name: str, num: int, d: int, h: int, exp_axis: str | None
                 ) -> dispatch_lib.ExpertParams:
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=-2, out_axis=-1, batch_axis=(0,))
        boxed = lambda names: nn.with_logical_partitioning(init, names)  # noqa: E731
        wi = self.param(f"{name}_wi", boxed((exp_axis, "embed", "mlp")), (num, d, h),
                        self.param_dtype)
        wo = self.param(f"{name}_wo", boxed((exp_axis, "mlp", "embed")), (num, h, d),
                        self.param_dtype)
        bi = bo = None
        if self.use_bias:
            zeros = nn.initializers.zeros
            bi = self.param(f"{name}_bi", nn.with_logical_partitioning(zeros, (exp_axis, "mlp")),
                            (num, h), self.param_dtype)
            bo = self.param(f"{name}_bo", nn.with_logical_partitioning(zeros, (exp_axis, "embed")),
                            (num, d), self.param_dtype)
        return dispatch_lib.ExpertParams(wi, wo, bi, bo)

    @nn.compact
    def __call__(self, x: jax.Array, *, group: jax.Array, valid: jax.Array | None = None
                 ) -> jax.Array:
        validate_config(ml_collections.ConfigDict(
            {f: getattr(self, f) for f in default_config().keys() if f != "name"}))
        B, L, D = x.shape
        E, k = self.num_routed, self.top_k
        T = B * L
        xt = x.reshape(T, D)
        grp = jnp.clip(group.reshape(T).astype(jnp.int32), 0, routing.NUM_GROUPS - 1)
        ok = jnp.ones((T,), bool) if valid is None else valid.reshape(T).astype(bool)

        # Router: float32 weights and math whatever the compute dtype. Its kernel is kept
        # whole on the expert axis: every token needs all 2E logits for its top-k.
        router_kernel = self.param(
            "router", nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
            (D, routing.NUM_GROUPS * E), jnp.float32)
        logits = jnp.matmul(xt.astype(jnp.float32), router_kernel,
                            precision=jax.lax.Precision.HIGHEST)  # no bf16 passes on TPU
        probs = routing.router_probs(logits, grp, E)
        weights, indices = routing.top_k_routing(probs, grp, E, k, self.renormalize)
        keep = jnp.broadcast_to(ok[:, None], (T, k))

        routed = self._experts("routed", routing.NUM_GROUPS * E, D, self.routed_hidden, "exp")
        if self.dispatch == "ragged":
            y = dispatch_lib.ragged_dispatch_combine(
                xt, indices, weights, keep, routed, impl=self._ragged_impl(),
                block_size=self.block_size, dtype=self.dtype)
            kept = keep
        else:
            capacity = dispatch_lib.compute_capacity(T, k, routing.NUM_GROUPS * E,
                                                     self.capacity_factor)
            y, kept = dispatch_lib.capacity_dispatch_combine(
                xt, indices, weights, keep, routed, capacity=capacity,
                method=self.capacity_method, dtype=self.dtype)
            dropped = jnp.sum(keep & ~kept) / jnp.maximum(jnp.sum(keep), 1)
            self.sow("intermediates", "dropped_fraction", dropped)

        if self.num_shared > 0:
            # The group axis (size 2) stays unsharded.
            shared = self._experts("shared", routing.NUM_GROUPS, D,
                                   self.num_shared * self.shared_hidden, None)
            y = y + dispatch_lib.ragged_dispatch_combine(
                xt, grp[:, None], jnp.ones((T, 1), jnp.float32), jnp.ones((T, 1), bool), shared,
                impl=self._ragged_impl(), block_size=self.block_size, dtype=self.dtype)

        self.sow("intermediates", "expert_counts",
                 routing.expert_counts(indices, kept, routing.NUM_GROUPS * E))
        balance = routing.load_balance_loss(probs, indices, grp, ok, E)
        if self.balance_weight_und:
            self.sow("aux_loss", "balance_und", self.balance_weight_und * balance[0])
        if self.balance_weight_gen:
            self.sow("aux_loss", "balance_gen", self.balance_weight_gen * balance[1])
        if self.z_loss_weight:
            self.sow("aux_loss", "router_z",
                     self.z_loss_weight * routing.router_z_loss(logits, grp, ok, E))
        return y.reshape(B, L, D).astype(self.dtype)


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises UserError naming the first bad field of a token_moe config."""
    def need(cond: bool, message: str) -> None:
        if not cond:
            raise UserError(f"ffn (token_moe): {message}")

    need(cfg.num_routed >= 1, f"num_routed must be >= 1, got {cfg.num_routed}")
    need(1 <= cfg.top_k <= cfg.num_routed,
         f"top_k must be in [1, num_routed={cfg.num_routed}], got {cfg.top_k}")
    need(cfg.num_shared >= 0, f"num_shared must be >= 0, got {cfg.num_shared}")
    need(cfg.routed_hidden >= 1, f"routed_hidden must be >= 1, got {cfg.routed_hidden}")
    need(cfg.num_shared == 0 or cfg.shared_hidden >= 1,
         f"shared_hidden must be >= 1, got {cfg.shared_hidden}")
    need(cfg.dispatch in DISPATCH_MODES,
         f"dispatch must be one of {DISPATCH_MODES}, got {cfg.dispatch!r}")
    need(cfg.capacity_factor > 0, f"capacity_factor must be > 0, got {cfg.capacity_factor}")
    need(cfg.capacity_method in dispatch_lib.CAPACITY_METHODS,
         f"capacity_method must be one of {dispatch_lib.CAPACITY_METHODS}, "
         f"got {cfg.capacity_method!r}")
    need(cfg.grouped_matmul in GROUPED_MATMULS,
         f"grouped_matmul must be one of {GROUPED_MATMULS}, got {cfg.grouped_matmul!r}")
    need(cfg.block_size >= 1, f"block_size must be >= 1, got {cfg.block_size}")
    for field in ("balance_weight_gen", "balance_weight_und", "z_loss_weight"):
        need(cfg[field] >= 0, f"{field} must be >= 0, got {cfg[field]}")


@FFN_SLOTS.register("token_moe")
def make_token_moe(cfg: ml_collections.ConfigDict, *, d_model: int, dtype, param_dtype,
                   name: str | None = None) -> nn.Module:
    """Builds `TokenMoE` from ``cfg`` (fields of `default_config`; missing ones take defaults)."""
    del d_model  # read from the input
    full = default_config()
    unknown = sorted(set(cfg.keys()) - set(full.keys()))
    if unknown:
        raise UserError(f"ffn (token_moe): unknown config field(s) {', '.join(unknown)}")
    full.update(cfg)
    validate_config(full)
    fields = {f: full[f] for f in full.keys() if f != "name"}
    return TokenMoE(**fields, dtype=dtype, param_dtype=param_dtype, name=name)
