"""Converted Show-o workdirs called as Show-o calls its model (the parity API).

``load_showo(OUT)`` (OUT from ``python -m unif2ace_jax.convert.showo``) gives a `ShowoModel`:

* ``.logits(ids [B, L], attend [B, L, L]) -> float32 [B, L, V]``: ids in Show-o's vocabulary
  (`Vocab` layout ``"showo"``), True = row may attend column, positions ``0 … L-1`` over the
  whole row, pads included (Show-o's ``PhiModel`` with the caller's 4-D mask). Masked scores
  are ``float32.min`` here and ``-9.22e18`` in Show-o: both give masked keys exactly zero
  weight in a row that attends to at least one key.
* ``.greedy_text(ids, attend, n) -> int32 [B, n]``: Show-o's ``mmu_generate`` with ``top_k=1``
  (argmax over the full vocabulary), with a KV cache instead of recomputation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from unif2ace_jax.checkpoint.trained import Trained, load_trained
from unif2ace_jax.errors import UserError
from unif2ace_jax.models.backbone import Backbone


@functools.partial(jax.jit, static_argnames=("model",))
def _logits(params, ids, attend, *, model: Backbone):
    b, length = ids.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    return model.apply({"params": params}, ids, mask=attend, positions=positions,
                       group=jnp.zeros((b, length), jnp.int32), valid=jnp.ones((b, length), bool))


@functools.partial(jax.jit, static_argnames=("model", "n", "eos_id", "pad_id"))
def _greedy(params, ids, attend, *, model: Backbone, n: int, eos_id: int, pad_id: int):
    b, p = ids.shape
    s = p + n
    variables = {"params": params}
    ones, zeros = jnp.ones((b, 1), bool), jnp.zeros((b, 1), jnp.int32)
    logits, cache = model.apply(
        variables, ids, cache=model.init_cache(b, s), cache_index=0,
        mask=jnp.concatenate([attend, jnp.zeros((b, p, n), bool)], axis=2),
        positions=jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p)),
        group=jnp.zeros((b, p), jnp.int32), valid=jnp.ones((b, p), bool),
        method=Backbone.decode)
    # A generated token sees what the last prompt token sees, and every generated token.
    row = jnp.concatenate([attend[:, -1, :], jnp.zeros((b, n), bool)], axis=1)
    out = jnp.zeros((b, n), jnp.int32)

    def step(t, carry):
        cache, row, out, token = carry
        out = out.at[:, t].set(token)
        row = row.at[:, p + t].set(True)
        logits, cache = model.apply(
            variables, token[:, None], cache=cache, cache_index=p + t, mask=row[:, None, :],
            positions=jnp.full((b, 1), p + t, jnp.int32), group=zeros, valid=ones,
            method=Backbone.decode)
        return cache, row, out, jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)

    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    _, _, out, _ = jax.lax.fori_loop(0, n, step, (cache, row, out, first))
    after_eos = jnp.cumsum(out == eos_id, axis=1) - (out == eos_id) > 0
    return jnp.where(after_eos, pad_id, out)


@dataclasses.dataclass
class ShowoModel:
    """A converted workdir, called as Show-o is: ids in its vocabulary, positions ``0 … L-1``."""

    trained: Trained

    @property
    def vocab(self):
        return self.trained.model.vocab

    def logits(self, ids, attend) -> np.ndarray:
        """``ids [B, L]`` int, ``attend [B, L, L]`` bool (True = row may attend column) ->
        float32 logits ``[B, L, V]``. Every row should attend at least one key."""
        return np.asarray(_logits(self.trained.params, jnp.asarray(ids, jnp.int32),
                                  jnp.asarray(attend, bool), model=self.trained.model.backbone))

    def greedy_text(self, ids, attend, n: int) -> np.ndarray:
        """Greedy continuation (argmax over the whole vocabulary, KV cache): ``[B, n]`` int32.
        Each new token attends to what the last prompt token attends to plus every generated
        token (Show-o's ``mmu_generate``, ``top_k=1``); after ``<eos>`` (50256), which Show-o
        stops at, the row holds ``[PAD]``."""
        if n < 1:
            raise UserError(f"n must be >= 1, got {n}")
        vocab = self.vocab
        return np.asarray(_greedy(self.trained.params, jnp.asarray(ids, jnp.int32),
                                  jnp.asarray(attend, bool), model=self.trained.model.backbone,
                                  n=int(n), eos_id=vocab.eos_id, pad_id=vocab.pad_id))


def load_showo(workdir: str) -> ShowoModel:
    """The converted workdir `workdir` (`convert_directory`'s output), for Show-o-style calls."""
    return ShowoModel(load_trained(workdir))
