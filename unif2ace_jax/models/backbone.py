"""The unified transformer backbone, Phi-1.5 layout (docs/DESIGN.md §3).

``embed_tokens -> layers (L blocks) -> final_layernorm -> lm_head`` (untied, with bias).

Block styles (``config.model.block_style``):

* ``parallel`` (Phi): ``x + Attn(LN(x)) + FFN(LN(x))``, one LayerNorm ``input_layernorm``.
* ``sequential`` (UniF²ace figure): ``x += Attn(LN1 x); x += FFN(LN2 x)``
  (``input_layernorm``, ``post_attention_layernorm``).

In both styles an optional sequence-level MoE branch follows: ``x += SeqMoE(LN3 x)``
(``seq_moe_layernorm``), built from `SEQ_MOE_SLOTS` by ``config.model.seq_moe.name`` (``none``
registers no branch). Seq-MoE slot contract: the factory is called as
``factory(cfg, d_model=..., dtype=..., param_dtype=..., name="seq_moe")`` and returns a module or
None; the module is called as ``module(h, *, group, valid, features) -> [B, L, D]`` where
``features`` is the dict passed to the backbone call (per-sequence expert inputs, e.g. CLIP /
face embeddings, noise level) or None. When decoding with a cache from `Backbone.init_cache`
it is called with ``pool_cache={"sum": [B, D], "count": [B]}`` too and returns
``(y, new_pool_cache)``. Modules registering into `FFN_SLOTS` / `SEQ_MOE_SLOTS` must be imported
before `build_backbone` runs.

Layers run under ``nn.scan`` (params stacked on a leading ``layers`` axis) or unrolled
(``layers_0 … layers_{L-1}``); `stack_layer_params` / `unstack_layer_params` convert between the
two. Remat policy by name (`unif2ace_jax.models.remat`). Activations are constrained to
``ACTIVATION_AXES`` at block boundaries.

Image-code input embedding (``config.model.image_code_embedding``, [ours]): ``table`` (one row
per code, as in Show-o) or ``table+bits``: the row plus ``W_bits · bits(c)``, where ``bits(c)`` is
code c's ±1 LFQ bit vector (`models.tokenizer.lfq.indices_to_codes`, log2 K bits). Codes that
share bits share part of their embedding from the first step, which a small model trained from
scratch on few images learns from much faster; ``table`` keeps the layout of converted weights.

Image-code logits (``config.model.image_code_logits``, [ours]): ``table`` (the LM head's rows of
the K codes) or ``table+bits``: those logits plus ``(h · U) · bits(c)`` with a learned
``U: [d_model, log2 K]`` (``code_bits_head``), so every LFQ bit of the predicted code gets its own
linear score, shared by all codes with that bit. `Backbone.code_logits` computes both.

Image-position embedding (``config.model.image_position_embedding``, [ours], off by default so
converted Show-o / Phi weights keep their layout): a learned row per place ``0 … N-1`` of the
image, added to the embedding of every image token (code or ``[MASK]``), place = the token's
rank among the sequence's image tokens (`image_token_index`). Without it a fully masked canvas
is N identical ``[MASK]`` inputs that only partial rotary tells apart. A sequence passed in
pieces (KV-cache decoding) must bring all of its image tokens in one piece (the prefix).

KV cache for decoding: ``{"k", "v"}: [num_layers, B, S, H, Dh]`` (see `Backbone.init_cache`,
`Backbone.decode`).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.ad_checkpoint import checkpoint_name

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.attention import Attention
from unif2ace_jax.models.ffn import FFN_SLOTS
from unif2ace_jax.models.remat import remat_policy
from unif2ace_jax.models.rotary import rotary_dim_for
from unif2ace_jax.models.tokenizer.lfq import indices_to_codes
from unif2ace_jax.models.vocab import Vocab
from unif2ace_jax.parallel import rules as rules_lib
from unif2ace_jax.registry import Registry
from unif2ace_jax.utils.defaults import with_defaults

# Logical axes of [B, L, D] activations (names of unif2ace_jax/parallel/rules.py).
ACTIVATION_AXES = ("batch", "length", "act_embed")
BLOCK_STYLES = ("parallel", "sequential")
IMAGE_CODE_OPTIONS = ("table", "table+bits")  # model.image_code_embedding / image_code_logits

SEQ_MOE_SLOTS: Registry = Registry("seq_moe")
# Cache entries of the seq-MoE router's pooled input (see `Backbone.init_cache`).
POOL_SUM = "seq_pool_sum"
POOL_COUNT = "seq_pool_count"


@SEQ_MOE_SLOTS.register("none")
def _no_seq_moe(cfg, *, d_model: int, dtype, param_dtype, name: str | None = None) -> None:
    del cfg, d_model, dtype, param_dtype, name
    return None


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype(name: Any) -> jnp.dtype:
    if not isinstance(name, str):
        return jnp.dtype(name)
    try:
        return _DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; known: {', '.join(_DTYPES)}") from None


def _layer_norm(eps: float, dtype, param_dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), name=name)


class Block(nn.Module):
    """One transformer layer. ``x [B, T, D] -> (x [B, T, D], new_cache | None)``.

    Positional arguments (so `nn.scan` / `nn.remat` can lift them):
    ``(x, cache, mask, positions, group, valid, cache_index, features, deterministic)``.
    """

    d_model: int
    num_heads: int
    rotary_dim: int
    ffn: ml_collections.FrozenConfigDict
    seq_moe: ml_collections.FrozenConfigDict
    block_style: str = "parallel"
    rope_theta: float = 1e4
    layer_norm_eps: float = 1e-5
    dropout_rate: float = 0.0
    init_std: float = 0.02
    qk_layernorm: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cache, mask, positions, group, valid, cache_index, features,
                 deterministic: bool = True):
        x = rules_lib.constrain(x, ACTIVATION_AXES)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = Attention(num_heads=self.num_heads, head_dim=self.d_model // self.num_heads,
                         rotary_dim=self.rotary_dim, rope_theta=self.rope_theta,
                         init_std=self.init_std, qk_layernorm=self.qk_layernorm,
                         layer_norm_eps=self.layer_norm_eps, name="self_attn", **kw)
        ffn = FFN_SLOTS.get(self.ffn.name)(self.ffn, d_model=self.d_model, name="mlp", **kw)
        drop = nn.Dropout(self.dropout_rate)

        def run_ffn(h):
            y = ffn(h, group=group, valid=valid)
            return drop(checkpoint_name(y, "mlp_out"), deterministic=deterministic)

        ln1 = _layer_norm(self.layer_norm_eps, name="input_layernorm", **kw)
        h = ln1(x)
        attn_cache = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        a, new_cache = attn(h, mask=mask, positions=positions, cache=attn_cache,
                            cache_index=cache_index)
        a = drop(a, deterministic=deterministic)
        if self.block_style == "parallel":
            x = x + a + run_ffn(h)
        elif self.block_style == "sequential":
            x = x + a
            ln2 = _layer_norm(self.layer_norm_eps, name="post_attention_layernorm", **kw)
            x = x + run_ffn(ln2(x))
        else:
            raise UserError(
                f"unknown block_style {self.block_style!r}; known: {', '.join(BLOCK_STYLES)}")

        seq_moe = SEQ_MOE_SLOTS.get(self.seq_moe.name)(
            self.seq_moe, d_model=self.d_model, name="seq_moe", **kw)
        if seq_moe is not None:
            ln3 = _layer_norm(self.layer_norm_eps, name="seq_moe_layernorm", **kw)
            if cache is not None and POOL_SUM in cache:
                # Decoding: the router's pooled input accumulates in the cache (see
                # `Backbone.init_cache`), so a step routes as the full sequence would.
                y, pool = seq_moe(ln3(x), group=group, valid=valid, features=features,
                                  pool_cache={"sum": cache[POOL_SUM], "count": cache[POOL_COUNT]})
                new_cache = dict(new_cache, **{POOL_SUM: pool["sum"], POOL_COUNT: pool["count"]})
            else:
                y = seq_moe(ln3(x), group=group, valid=valid, features=features)
            x = x + drop(y, deterministic=deterministic)
        x = rules_lib.constrain(x, ACTIVATION_AXES)
        return x, new_cache


class Backbone(nn.Module):
    """The unified model: token ids -> float32 logits over the whole vocabulary."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    ffn: ml_collections.FrozenConfigDict
    seq_moe: ml_collections.FrozenConfigDict
    block_style: str = "parallel"
    rotary_fraction: float = 0.5
    rope_theta: float = 1e4
    layer_norm_eps: float = 1e-5
    dropout_rate: float = 0.0
    init_std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = True
    image_code_embedding: str = "table"  # table | table+bits
    image_code_logits: str = "table"  # table | table+bits
    image_offset: int = 0  # id of image code 0 (read with "table+bits")
    num_image_codes: int = 0  # K, a power of two (read with "table+bits")
    image_position_embedding: bool = False
    num_image_tokens: int = 0  # N (read with image_position_embedding)
    qk_layernorm: bool = False  # per-head LayerNorm of q and k (Show-o's Phi)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def setup(self):
        if self.d_model % self.num_heads:
            raise UserError(
                f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embed_tokens = nn.Embed(
            self.vocab_size, self.d_model,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(self.init_std), ("vocab", "embed")), **kw)
        if self.image_position_embedding:
            self.embed_image_positions = nn.Embed(
                self.num_image_tokens, self.d_model,
                embedding_init=nn.with_logical_partitioning(
                    nn.initializers.normal(self.init_std), (None, "embed")), **kw)
        if self.image_code_embedding == "table+bits":
            self.embed_code_bits = nn.Dense(
                self.d_model, use_bias=False, kernel_init=nn.with_logical_partitioning(
                    nn.initializers.normal(self.init_std), (None, "embed")), **kw)
        if self.image_code_logits == "table+bits":
            # Read by `code_logits`: a logit term linear in each code's LFQ bits.
            self.code_bits_head = nn.Dense(
                self.num_image_codes.bit_length() - 1, use_bias=False,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.normal(self.init_std), ("embed", None)), **kw)
        block_kwargs = dict(
            d_model=self.d_model, num_heads=self.num_heads,
            rotary_dim=rotary_dim_for(self.head_dim, self.rotary_fraction), ffn=self.ffn,
            seq_moe=self.seq_moe, block_style=self.block_style, rope_theta=self.rope_theta,
            layer_norm_eps=self.layer_norm_eps, dropout_rate=self.dropout_rate,
            init_std=self.init_std, qk_layernorm=self.qk_layernorm, **kw)
        block_cls = Block
        policy = remat_policy(self.remat_policy)
        if policy is not None:
            block_cls = nn.remat(block_cls, policy=policy, prevent_cse=not self.scan_layers,
                                 static_argnums=(9,))
        if self.scan_layers:
            scanned = nn.scan(
                block_cls,
                variable_axes={"params": 0, "aux_loss": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0,) + (nn.broadcast,) * 7,
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})
            self.layers = scanned(**block_kwargs)
        else:
            self.layers = [block_cls(**block_kwargs) for _ in range(self.num_layers)]
        self.final_layernorm = _layer_norm(self.layer_norm_eps, name=None, **kw)
        self.lm_head = nn.Dense(
            self.vocab_size,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.normal(self.init_std), ("embed", "vocab")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)), **kw)

    def _trunk(self, tokens, cache, mask, positions, group, valid, cache_index, features,
               deterministic):
        tokens = jnp.asarray(tokens, jnp.int32)
        x = self.embed_tokens(tokens).astype(self.dtype)
        if self.image_code_embedding == "table+bits":
            codes = tokens - self.image_offset
            is_code = (codes >= 0) & (codes < self.num_image_codes)
            bits = indices_to_codes(jnp.where(is_code, codes, 0),
                                    self.num_image_codes.bit_length() - 1, self.dtype)
            x = x + jnp.where(is_code[..., None], self.embed_code_bits(bits), 0).astype(self.dtype)
        if self.image_position_embedding:
            is_image, place = image_token_index(tokens, self.image_offset, self.num_image_codes)
            place = jnp.minimum(place, self.num_image_tokens - 1)
            x = x + jnp.where(is_image[..., None], self.embed_image_positions(place),
                              0).astype(self.dtype)
        x = rules_lib.constrain(x, ACTIVATION_AXES)
        args = (mask, positions, group, valid, cache_index, features, deterministic)
        if self.scan_layers:
            x, new_cache = self.layers(x, cache, *args)
        else:
            outs = []
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
                x, c = layer(x, layer_cache, *args)
                outs.append(c)
            new_cache = None if cache is None else jax.tree.map(lambda *c: jnp.stack(c), *outs)
        return self.final_layernorm(x), new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``hidden [..., D]`` (final-LN output) -> ``[..., V]`` float32 logits."""
        return self.lm_head(hidden).astype(jnp.float32)

    def code_logits(self, hidden: jax.Array) -> jax.Array:
        """``hidden [B, N, D]`` (final-LN output at image places) -> ``[B, N, K]`` float32
        logits over the K image codes: the lm head's code columns ``[image_offset,
        image_offset + K)``, plus with ``image_code_logits="table+bits"`` the per-bit term
        ``(h · U) · bits(c)``. Slices the head's params rather than computing all V columns."""
        head = self.lm_head.variables["params"]
        lo, k = self.image_offset, self.num_image_codes
        dtype = self.dtype
        kernel = jax.lax.slice_in_dim(head["kernel"], lo, lo + k, axis=1).astype(dtype)
        bias = jax.lax.slice_in_dim(head["bias"], lo, lo + k, axis=0).astype(dtype)
        out = jnp.einsum("bnd,dk->bnk", hidden.astype(dtype), kernel) + bias
        if self.image_code_logits == "table+bits":
            bits = indices_to_codes(jnp.arange(k), k.bit_length() - 1, dtype)  # [K, log2 K]
            per_bit_kernel = self.code_bits_head.variables["params"]["kernel"]
            per_bit = jnp.einsum("bnd,dc->bnc", hidden.astype(dtype), per_bit_kernel.astype(dtype))
            out = out + jnp.einsum("bnc,kc->bnk", per_bit, bits)
        return out.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, *, mask: jax.Array, positions: jax.Array,
                 group: jax.Array, valid: jax.Array,
                 features: Mapping[str, jax.Array] | None = None, deterministic: bool = True,
                 return_hidden: bool = False) -> jax.Array:
        """Full-sequence forward pass.

        Args:
          tokens: ``[B, L]`` int ids; mask: ``[B, L, L]`` bool (`omni_attention_mask`);
          positions: ``[B, L]`` int; group: ``[B, L]`` int (0 und, 1 gen); valid: ``[B, L]`` bool;
          features: per-sequence inputs for the seq-MoE slot (or None).
          return_hidden: return the final-LN hidden states ``[B, L, D]`` instead of logits
            (gather positions first, then call `logits` via ``method=Backbone.logits``).

        Returns ``[B, L, V]`` float32 logits (or the hidden states).
        """
        hidden, _ = self._trunk(tokens, None, mask, positions, group, valid, None, features,
                                deterministic)
        if self.image_code_logits == "table+bits" and self.is_initializing():
            self.code_bits_head(hidden)  # creates its params; `code_logits` reads them
        return hidden if return_hidden else self.logits(hidden)

    def decode(self, tokens: jax.Array, *, cache: dict, cache_index: jax.Array,
               mask: jax.Array, positions: jax.Array, group: jax.Array, valid: jax.Array,
               features: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, dict]:
        """Forward pass of T new tokens against a KV cache (prefill: T = prefix; step: T = 1).

        Args:
          tokens: ``[B, T]``; cache: ``{"k", "v"}: [num_layers, B, S, H, Dh]``;
          cache_index: scalar int, cache slot of ``tokens[:, 0]``; mask: ``[B, T, S]`` bool over
          cache slots (must include the T new slots themselves); positions, group, valid:
          ``[B, T]``.

        Returns ``(logits [B, T, V] float32, updated cache)``.
        """
        hidden, new_cache = self._trunk(tokens, cache, mask, positions, group, valid,
                                        cache_index, features, True)
        return self.logits(hidden), new_cache

    def init_cache(self, batch: int, length: int, dtype: Any = None) -> dict:
        """Zero KV cache ``{"k", "v"}: [num_layers, batch, length, H, Dh]`` (compute dtype).

        With a seq-MoE slot it also holds the running sum of the router's pooled input,
        ``seq_pool_sum [num_layers, batch, D]`` and ``seq_pool_count [num_layers, batch]``
        (float32): decode steps add their pooled tokens (``features["pool_mask"]``), so a step
        routes on the same pooled vector as a full pass over the sequence.
        """
        shape = (self.num_layers, batch, length, self.num_heads, self.head_dim)
        dt = self.dtype if dtype is None else dtype
        cache = {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}
        if self.seq_moe.get("name", "none") != "none":
            cache[POOL_SUM] = jnp.zeros((self.num_layers, batch, self.d_model), jnp.float32)
            cache[POOL_COUNT] = jnp.zeros((self.num_layers, batch), jnp.float32)
        return cache


def stack_layer_params(params: Mapping[str, Any], num_layers: int) -> dict:
    """Unrolled params (``layers_0 …``) -> scanned params (``layers``, leading layer axis).

    Works on plain or boxed (`nn.LogicallyPartitioned`) trees: boxes of the stacked tree get the
    ``layers`` name in front.
    """
    params = dict(params)
    per_layer = [params.pop(f"layers_{i}") for i in range(num_layers)]

    def stack(*leaves):
        if isinstance(leaves[0], nn.LogicallyPartitioned):
            return leaves[0].replace(value=jnp.stack([l.value for l in leaves]),
                                     names=("layers",) + tuple(leaves[0].names))
        return jnp.stack(leaves)

    params["layers"] = jax.tree.map(stack, *per_layer,
                                    is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return params


def unstack_layer_params(params: Mapping[str, Any], num_layers: int) -> dict:
    """Scanned params (``layers``) -> unrolled params (``layers_0 …``). Plain arrays only."""
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(num_layers):
        params[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked)
    return params


def default_config() -> ml_collections.ConfigDict:
    """Every field of ``config.model`` (read by `build_backbone` and `unified.build_model`),
    with its default: a tiny CPU-sized dense model.

    ``ffn`` and ``seq_moe`` are slots: their fields are those of the named factory's own
    ``default_config`` (e.g. `moe.token_moe.default_config`), filled in by the factory.
    ``num_image_codes`` / ``image_grid`` (0 = take them from the image tokenizer),
    ``vocab_pad_to_multiple`` (embedding rows rounded up, e.g. 128 for TPU tensor sharding),
    ``group_assignment`` and ``position_mode`` (sequence options) and ``vocab_layout``
    (`Vocab.layout`: "unif2ace" or "showo") are read by the unified model. ``qk_layernorm``:
    Show-o's per-head LayerNorm of q and k (`attention.Attention`).
    """
    return ml_collections.ConfigDict(dict(
        num_image_codes=0, image_grid=0, vocab_pad_to_multiple=1,
        d_model=64, num_layers=2, num_heads=4,
        ffn=dict(name="dense", hidden=256),
        block_style="parallel", rotary_fraction=0.5, rope_theta=1e4, layer_norm_eps=1e-5,
        dropout_rate=0.0, init_std=0.02, dtype="float32", param_dtype="float32",
        remat_policy="none", scan_layers=True, group_assignment="task",
        position_mode="valid", seq_moe=dict(name="none"), image_code_embedding="table",
        image_code_logits="table", image_position_embedding=False, qk_layernorm=False,
        vocab_layout="unif2ace"))


SLOT_FIELDS = ("ffn", "seq_moe")  # replaced whole by a config (their factories fill them)


def full_model_config(given=None) -> ml_collections.ConfigDict:
    """``config.model``: `default_config` updated with `given` (unknown fields refused)."""
    return with_defaults(default_config(), given, "model", whole=SLOT_FIELDS)


def image_token_index(tokens: jax.Array, image_offset: int, num_image_codes: int
                      ) -> tuple[jax.Array, jax.Array]:
    """``tokens [B, L] -> (is_image [B, L] bool, place [B, L] int32)``: image tokens are the ids
    ``image_offset … image_offset + K`` (the K codes and ``[MASK]``); place is an image token's
    rank among the row's image tokens (0 for the first), 0 elsewhere."""
    is_image = (tokens >= image_offset) & (tokens <= image_offset + num_image_codes)
    place = jnp.cumsum(is_image.astype(jnp.int32), axis=-1) - 1
    return is_image, jnp.where(is_image, place, 0)


def _image_code_option(c: ml_collections.ConfigDict, key: str, num_codes: int) -> str:
    """``model.<key>`` ("table" | "table+bits"), checked: bits need a power-of-two codebook."""
    value = c[key]
    if value not in IMAGE_CODE_OPTIONS:
        raise UserError(f"unknown model.{key} {value!r}; known: {', '.join(IMAGE_CODE_OPTIONS)}")
    if value == "table+bits" and (num_codes < 2 or num_codes & (num_codes - 1)):
        raise UserError(f"model.{key}='table+bits' needs a power-of-two number of image codes "
                        f"(an LFQ codebook), got {num_codes}")
    return value


def build_backbone(model_config: ml_collections.ConfigDict, vocab: Vocab,
                   num_image_tokens: int = 0) -> Backbone:
    """Builds the backbone from ``config.model``; the vocabulary size comes from `vocab`, N (the
    image-position embedding's rows) from `num_image_tokens`."""
    c = full_model_config(model_config)
    image_positions = bool(c.image_position_embedding)
    if image_positions and num_image_tokens < 1:
        raise UserError("model.image_position_embedding needs the number of image tokens "
                        f"(image_grid ** 2), got {num_image_tokens}")

    def frozen(section) -> ml_collections.FrozenConfigDict:
        if isinstance(section, ml_collections.FrozenConfigDict):
            return section
        return ml_collections.FrozenConfigDict(section)

    style = c.block_style
    if style not in BLOCK_STYLES:
        raise UserError(f"unknown block_style {style!r}; known: {', '.join(BLOCK_STYLES)}")
    remat_policy(c.remat_policy)  # validates the name early
    k = vocab.num_image_codes
    code_embedding, code_logits = (_image_code_option(c, key, k)
                                   for key in ("image_code_embedding", "image_code_logits"))
    seq_moe = c.seq_moe
    FFN_SLOTS.get(c.ffn.name)
    SEQ_MOE_SLOTS.get(seq_moe.name)
    return Backbone(
        vocab_size=vocab.size, d_model=c.d_model, num_layers=c.num_layers,
        num_heads=c.num_heads, ffn=frozen(c.ffn), seq_moe=frozen(seq_moe), block_style=style,
        rotary_fraction=c.rotary_fraction, rope_theta=c.rope_theta,
        layer_norm_eps=c.layer_norm_eps, dropout_rate=c.dropout_rate,
        init_std=c.init_std, dtype=_dtype(c.dtype),
        param_dtype=_dtype(c.param_dtype),
        remat_policy=c.remat_policy, scan_layers=c.scan_layers,
        image_code_embedding=code_embedding, image_code_logits=code_logits,
        image_offset=vocab.image_offset,
        num_image_codes=k, image_position_embedding=image_positions,
        num_image_tokens=int(num_image_tokens), qk_layernorm=bool(c.qk_layernorm))
