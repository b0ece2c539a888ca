"""MMU (visual question answering) decoding with a KV cache (docs/DESIGN.md §7).

The prefix ``<mmu> <soi> img… <eoi> <bos> question`` (from `build_mmu_prefix`, left or right
padded) is run once through `Backbone.decode` with its omni-attention mask (bidirectional inside
the image), filling the KV cache; then one token at a time is sampled and fed back in a jitted
`lax.while_loop`, until every row has produced ``<eos>`` or ``max_new_tokens`` are out.

Cache slot layout: slots ``[0, P)`` hold the prefix (pads included, masked out), slot ``P + t``
the t-th generated token; its rotary position is ``(last prefix position) + 1 + t``, so with the
builder's ``position_mode="valid"`` the answer continues exactly as in training whichever side
the prefix was padded on. Prefix rows never see later tokens (text rows are causal, image rows
stop at ``<eoi>``), so the cached keys/values equal those of a full recomputation.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.backbone import Backbone
from unif2ace_jax.models.masks import omni_attention_mask
from unif2ace_jax.models.sequences import GROUP_UND
from unif2ace_jax.models.vocab import Vocab


def sample_tokens(logits: jax.Array, rng: jax.Array, *, temperature: float = 0.0,
                  top_k: int = 0, allowed: jax.Array | None = None) -> jax.Array:
    """Picks one token per row. ``logits [B, V]`` -> ``[B]`` int32.

    ``temperature == 0`` is greedy (argmax); otherwise sample from ``softmax(logits / T)``
    restricted to the ``top_k`` largest (0 = all). ``allowed [V]`` bool excludes ids.
    """
    logits = logits.astype(jnp.float32)
    neg = jnp.finfo(jnp.float32).min
    if allowed is not None:
        logits = jnp.where(allowed[None, :], logits, neg)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _last_true(x: jax.Array) -> jax.Array:
    """Index of the last True per row of ``[B, L]`` bool (0 if none)."""
    length = x.shape[1]
    return length - 1 - jnp.argmax(x[:, ::-1], axis=1)


@functools.partial(jax.jit, static_argnames=("model", "vocab", "max_new_tokens", "temperature",
                                             "top_k", "restrict_to_text", "return_logits"))
def _decode(params, prefix, rng, features, *, model: Backbone, vocab: Vocab,
            max_new_tokens: int, temperature: float, top_k: int, restrict_to_text: bool,
            return_logits: bool):
    tokens = prefix["tokens"]
    valid = prefix["valid"]
    b, p = tokens.shape
    s = p + max_new_tokens
    slots = jnp.arange(s, dtype=jnp.int32)

    if "attend" in prefix:  # the prompt's own mask (`sequences.showo_prompt`)
        mask = prefix["attend"]
    else:
        mask = omni_attention_mask(~valid, prefix["image_span"])
    mask = jnp.concatenate([mask, jnp.zeros((b, p, max_new_tokens), bool)], axis=2)
    # A seq-MoE router pools the prefix (the prompt) and none of the generated tokens, as the
    # training pass does (`seq_routing.prompt_pool_mask`); dense models ignore the features.
    step_features = dict(features or {}, pool_mask=jnp.zeros((b, 1), bool))
    logits, cache = model.apply(
        params, tokens, cache=model.init_cache(b, s), cache_index=0, mask=mask,
        positions=prefix["positions"], group=prefix["group"], valid=valid,
        features=dict(features or {}, pool_mask=valid), method=Backbone.decode)
    first_logits = jnp.take_along_axis(logits, _last_true(valid)[:, None, None], axis=1)[:, 0]
    cache_valid = jnp.concatenate([valid, jnp.zeros((b, max_new_tokens), bool)], axis=1)
    next_pos = jnp.max(jnp.where(valid, prefix["positions"], -1), axis=1) + 1
    allowed = None
    if restrict_to_text:
        ids = jnp.arange(model.vocab_size)
        allowed = (ids < vocab.text_size) | (ids == vocab.eos_id)

    out = jnp.full((b, max_new_tokens), vocab.pad_id, jnp.int32)
    step_logits = jnp.zeros((b, max_new_tokens, model.vocab_size) if return_logits else (0,),
                            jnp.float32)
    done = jnp.zeros((b,), bool)
    state = (jnp.int32(0), cache, cache_valid, first_logits, out, step_logits, done, rng)

    def cond(state):
        t, *_, done, _ = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
        t, cache, cache_valid, cur_logits, out, step_logits, done, rng = state
        rng, key = jax.random.split(rng)
        token = sample_tokens(cur_logits, key, temperature=temperature, top_k=top_k,
                              allowed=allowed)
        token = jnp.where(done, vocab.pad_id, token)
        out = out.at[:, t].set(token)
        if return_logits:
            step_logits = step_logits.at[:, t].set(cur_logits)
        done = done | (token == vocab.eos_id)
        slot = p + t
        cache_valid = cache_valid.at[:, slot].set(True)
        step_mask = (cache_valid & (slots[None, :] <= slot))[:, None, :]
        logits, cache = model.apply(
            params, token[:, None], cache=cache, cache_index=slot, mask=step_mask,
            positions=(next_pos + t)[:, None], group=jnp.full((b, 1), GROUP_UND, jnp.int32),
            valid=jnp.ones((b, 1), bool), features=step_features, method=Backbone.decode)
        return (t + 1, cache, cache_valid, logits[:, 0], out, step_logits, done, rng)

    _, _, _, _, out, step_logits, done, _ = jax.lax.while_loop(cond, body, state)
    is_eos = out == vocab.eos_id
    length = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), max_new_tokens)
    result = {"tokens": out, "length": length.astype(jnp.int32), "done": done}
    if return_logits:
        result["logits"] = step_logits
    return result


def mmu_decode(model: Backbone, params: Any, prefix: Mapping[str, jax.Array], *, vocab: Vocab,
               max_new_tokens: int, rng: jax.Array | None = None, temperature: float = 0.0,
               top_k: int = 0, restrict_to_text: bool = True, return_logits: bool = False,
               features: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    """Answers a batch of questions about images.

    Args:
      model: the backbone module; params: its variables (``{"params": ...}``).
      prefix: output of `build_mmu_prefix` (``tokens, valid, positions, group, image_span``
        ``[B, P]``), and optionally ``attend [B, P, P]`` bool (`showo_prompt`), used instead of
        the omni-attention mask.
      max_new_tokens: T, the most tokens generated per row (``<eos>`` included).
      rng: needed when ``temperature > 0``. temperature 0 = greedy; top_k 0 = no cut.
      restrict_to_text: only text ids and ``<eos>`` may be generated.
      return_logits: also return the logits each token was chosen from.
      features: per-sequence inputs for a seq-MoE slot, if the model has one.

    Returns ``tokens [B, T]`` int32 (``<pad>`` after ``<eos>``), ``length [B]`` (answer tokens
    before ``<eos>``), ``done [B]`` bool (``<eos>`` seen), and ``logits [B, T, V]`` float32 if
    asked (rows after ``<eos>`` hold zeros or later-step values; ignore them).
    """
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise UserError("sampling with temperature > 0 needs an rng")
    if rng is None:
        rng = jax.random.key(0)
    keys = ("tokens", "valid", "positions", "group", "image_span")
    keys += ("attend",) if "attend" in prefix else ()
    prefix = {k: jnp.asarray(prefix[k]) for k in keys}
    return _decode(params, prefix, rng, features, model=model, vocab=vocab,
                   max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                   top_k=int(top_k), restrict_to_text=bool(restrict_to_text),
                   return_logits=bool(return_logits))
