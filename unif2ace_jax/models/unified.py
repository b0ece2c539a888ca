"""The unified model as a whole: vocabulary + backbone from config, forward on a batch.

This is glue around `Backbone` (docs/DESIGN.md §1-§3): it fixes the vocabulary from the two tokenizers,
turns sequences (from `models.sequences`) into the omni-attention mask and backbone call, sums
the MoE auxiliary losses, and gathers the image logits restricted to the K image-code ids.

`UnifiedModel` is a frozen dataclass (hashable), so it can be a static argument of `jax.jit`::

    model = build_model(config.model, text_vocab_size=512, num_image_codes=1024, image_grid=8)
    variables = model.init(rng, batch_size=2, text_width=16, answer_width=4)   # boxed params
    hidden, aux = model.forward(params, seqs, features=...)       # [B, L, D], scalar
    img = model.image_logits(params, hidden, seqs["image_positions"])   # [B, N, K]
    txt = model.text_logits(params, hidden)                        # [B, L, V]

Image logits are computed only at the N image positions, and only for the K code columns of
the lm head (``[image_offset, image_offset + K)``): the D3Diff loss and the T2I samplers see a
distribution over codes only, never over text ids or ``[MASK]`` (Show-o does the same slice).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# Imported for its registrations: the token_moe FFN slot and the grouped_seq_moe slot.
import unif2ace_jax.models.moe  # noqa: F401
from unif2ace_jax.errors import UserError
from unif2ace_jax.models.backbone import Backbone, build_backbone, full_model_config
from unif2ace_jax.models.masks import omni_attention_mask
from unif2ace_jax.models.moe.seq_routing import prompt_pool_mask
from unif2ace_jax.models.sequences import (GROUP_ASSIGNMENTS, POSITION_MODES, build_sequences,
                                           sequence_length)
from unif2ace_jax.models.vocab import Vocab


@dataclasses.dataclass(frozen=True)
class UnifiedModel:
    """Backbone + vocabulary + the sequence options the model was trained with."""

    backbone: Backbone
    vocab: Vocab
    image_grid: int  # h = w of the image-code grid; N = image_grid ** 2
    group_assignment: str = "task"
    position_mode: str = "valid"

    @property
    def num_image_tokens(self) -> int:
        return self.image_grid * self.image_grid

    @property
    def num_image_codes(self) -> int:
        return self.vocab.num_image_codes

    # -----------------------------------------------------------------------------------------
    # Sequences

    def sequences(self, batch: Mapping[str, Any], *, rng: jax.Array | None = None,
                  cond_dropout: float = 0.0) -> dict[str, jax.Array]:
        """`build_sequences` with this model's vocabulary and options."""
        return build_sequences(batch, self.vocab, rng=rng, cond_dropout=cond_dropout,
                               group_assignment=self.group_assignment,
                               position_mode=self.position_mode)

    def dummy_batch(self, batch_size: int, text_width: int, answer_width: int
                    ) -> dict[str, np.ndarray]:
        """A raw batch of zeros with the given shapes (for init and shape inference)."""
        b = batch_size
        return {
            "task": np.zeros((b,), np.int32),
            "text": np.zeros((b, text_width), np.int32),
            "text_len": np.zeros((b,), np.int32),
            "answer": np.zeros((b, answer_width), np.int32),
            "answer_len": np.zeros((b,), np.int32),
            "image_codes": np.zeros((b, self.num_image_tokens), np.int32),
        }

    # -----------------------------------------------------------------------------------------
    # Parameters

    def init(self, rng: jax.Array, *, batch_size: int = 1, text_width: int = 4,
             answer_width: int = 1, features: Mapping[str, jax.Array] | None = None) -> dict:
        """Boxed variables (`nn.LogicallyPartitioned` leaves) ``{"params": ...}``.

        Parameter shapes do not depend on the sequence length; small dummy shapes suffice.
        Pass `features` when the seq-MoE needs some (their shapes fix its parameters).
        """
        seqs = self.sequences(self.dummy_batch(batch_size, text_width, answer_width))
        if features is None:
            features = default_features(seqs["task"], jnp.zeros((batch_size,), jnp.float32))
        variables = self.backbone.init(
            {"params": rng, "dropout": rng}, seqs["tokens"],
            mask=omni_attention_mask(seqs["is_pad"], seqs["image_span"]),
            positions=seqs["positions"], group=seqs["group"], valid=seqs["valid"],
            features=features)
        return {"params": variables["params"]}

    # -----------------------------------------------------------------------------------------
    # Forward

    def forward(self, params: Any, seqs: Mapping[str, jax.Array], *,
                features: Mapping[str, jax.Array] | None = None,
                dropout_rng: jax.Array | None = None, aux_parts: bool = False
                ) -> tuple[jax.Array, Any]:
        """Backbone pass over built sequences.

        Args:
          params: unboxed backbone params (the ``"params"`` collection).
          seqs: output of `sequences` / `build_t2i_prompt` / `build_mmu_prefix` (uses
            ``tokens, is_pad, image_span, positions, group, valid`` ``[B, L]``), or of
            `showo_prompt`, whose ``attend [B, L, L]`` replaces the omni-attention mask.
          features: per-sequence inputs of the seq-MoE slot (see `default_features`).
          dropout_rng: enables dropout (training) when given.

        Returns ``(hidden [B, L, D] final-LN states, aux_loss scalar float32)``, the latter the
        sum of every value the modules sowed into the ``aux_loss`` collection; with
        ``aux_parts`` the second item is ``{name: float32 scalar}`` instead, one entry per sown
        name summed over layers (e.g. ``balance_und, balance_gen, router_z,
        seq_moe_balance``). With a seq-MoE, ``features["pool_mask"]`` defaults to
        `seq_routing.prompt_pool_mask` (the router never pools answer tokens).
        """
        if "attend" in seqs:  # a prompt with its own mask (`sequences.showo_prompt`)
            mask = seqs["attend"]
        else:
            mask = omni_attention_mask(seqs["is_pad"], seqs["image_span"])
        if self.backbone.seq_moe.get("name", "none") != "none" and not (
                features and "pool_mask" in features):
            features = dict(features or {}, pool_mask=prompt_pool_mask(
                seqs["valid"], seqs.get("target_weights")))
        rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
        hidden, state = self.backbone.apply(
            {"params": params}, seqs["tokens"], mask=mask, positions=seqs["positions"],
            group=seqs["group"], valid=seqs["valid"], features=features,
            deterministic=dropout_rng is None, return_hidden=True, rngs=rngs,
            mutable=["aux_loss"])
        if aux_parts:
            return hidden, aux_loss_parts(state)
        aux = sum((jnp.sum(x).astype(jnp.float32) for x in jax.tree.leaves(state)),
                  jnp.zeros((), jnp.float32))
        return hidden, aux

    def text_logits(self, params: Any, hidden: jax.Array) -> jax.Array:
        """``hidden [..., D]`` -> ``[..., V]`` float32 logits over the whole vocabulary."""
        return self.backbone.apply({"params": params}, hidden, method=Backbone.logits)

    def image_logits(self, params: Any, hidden: jax.Array,
                     image_positions: jax.Array) -> jax.Array:
        """Logits over the K image codes at the image positions.

        Args:
          hidden: ``[B, L, D]`` final-LN states; image_positions: ``[B, N]`` int.
        Returns ``[B, N, K]`` float32 (`Backbone.code_logits`): the lm head's code columns
        only (plus the per-bit term with ``image_code_logits="table+bits"``).
        """
        h = jnp.take_along_axis(hidden, image_positions[..., None].astype(jnp.int32), axis=1)
        return self.backbone.apply({"params": params}, h, method=Backbone.code_logits)

    def code_logits_fn(self, params: Any, prompt: Mapping[str, jax.Array],
                       features: Mapping[str, jax.Array] | None = None):
        """``codes [B, N] -> logits [B, N, K]`` for a T2I prompt (the samplers' logits_fn).

        `prompt` is a `build_t2i_prompt` dict of batch B; ``codes`` hold K (= mask) at unknown
        places and are written into the prompt's image positions before each pass. When
        `features` has ``mask_ratio``, each pass replaces it by `masked_fraction` of the codes
        it gets (the noise level of the current sampler step, as in training), so the samplers
        need not know about it.
        """
        positions = prompt["image_positions"]

        def fn(codes: jax.Array) -> jax.Array:
            ids = self.vocab.codes_to_ids(codes)
            rows = jnp.arange(codes.shape[0])[:, None]
            tokens = prompt["tokens"].at[rows, positions].set(ids)
            seqs = dict(prompt, tokens=tokens)
            feats = features
            if feats is not None and "mask_ratio" in feats:
                feats = dict(feats, mask_ratio=masked_fraction(codes, self.num_image_codes))
            hidden, _ = self.forward(params, seqs, features=feats)
            return self.image_logits(params, hidden, positions)

        return fn


def aux_loss_parts(state: Mapping[str, Any]) -> dict[str, jax.Array]:
    """``{name: float32 scalar}``: the sown ``aux_loss`` values summed per leaf name (over
    layers and modules); ``state`` is the mutable-collections dict of an ``apply``."""
    parts: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state.get("aux_loss", {})):
        keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        name = str(keys[-1]) if keys else "aux"
        parts[name] = parts.get(name, 0.0) + jnp.sum(leaf).astype(jnp.float32)
    return parts


def masked_fraction(codes: jax.Array, mask_id: int) -> jax.Array:
    """``codes [B, N] int -> [B] float32``: the fraction of places holding `mask_id`."""
    return jnp.mean((codes == mask_id).astype(jnp.float32), axis=-1)


def default_features(task: jax.Array, mask_ratio: jax.Array,
                     extra: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    """The per-sequence features the seq-MoE slot reads.

    ``task [B]`` int (0 T2I, 1 MMU, 2 LM), ``mask_ratio [B]`` float (the noise level of T2I rows:
    the fraction of masked image tokens; 0 for other rows), plus any precomputed fields
    (``extra``, e.g. ``clip [B, Dc]``, ``face [B, Df]``, ``<name>_present [B]``).
    """
    feats = {"task": jnp.asarray(task, jnp.int32),
             "mask_ratio": jnp.asarray(mask_ratio, jnp.float32)}
    if extra:
        feats.update({k: jnp.asarray(v) for k, v in extra.items()})
    return feats


def build_model(model_config: ml_collections.ConfigDict, *, text_vocab_size: int,
                num_image_codes: int, image_grid: int) -> UnifiedModel:
    """The unified model from ``config.model`` and the two tokenizers' sizes.

    ``config.model``: fields of `backbone.default_config` (missing ones take its defaults).
    """
    model_config = full_model_config(model_config)
    if image_grid < 1:
        raise UserError(f"image grid must be >= 1, got {image_grid}")
    group_assignment = model_config.group_assignment
    if group_assignment not in GROUP_ASSIGNMENTS:
        raise UserError(f"unknown model.group_assignment {group_assignment!r}; known: "
                        f"{', '.join(GROUP_ASSIGNMENTS)}")
    position_mode = model_config.position_mode
    if position_mode not in POSITION_MODES:
        raise UserError(f"unknown model.position_mode {position_mode!r}; known: "
                        f"{', '.join(POSITION_MODES)}")
    vocab = Vocab(text_size=int(text_vocab_size), num_image_codes=int(num_image_codes),
                  pad_to_multiple=int(model_config.vocab_pad_to_multiple),
                  layout=model_config.vocab_layout)
    backbone = build_backbone(model_config, vocab, num_image_tokens=int(image_grid) ** 2)
    return UnifiedModel(backbone=backbone, vocab=vocab,
                        image_grid=int(image_grid), group_assignment=group_assignment,
                        position_mode=position_mode)


def train_sequence_length(model: UnifiedModel, text_width: int, answer_width: int) -> int:
    """``L = Lt + La + N + 5`` of a training batch."""
    return sequence_length(text_width, answer_width, model.num_image_tokens)
