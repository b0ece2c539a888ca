"""Image-tokenizer losses and metrics as pure functions (docs/DESIGN.md §8).

* Reconstruction: ``l1 · mean|x - x̂| + l2 · mean (x - x̂)²`` on images in [-1, 1].
* LFQ entropy loss: ``mean per-sample entropy - entropy of the batch-mean code distribution``
  (minimising it makes each token's assignment confident and the codebook usage even).
  The soft assignment is ``p(c | z) ∝ exp(-||z - c||²/τ)`` (see `models.tokenizer.lfq`), which
  factorises over bits, so the per-sample entropy is exactly ``Σ_j H(p_j)`` in either mode.
  The batch term has two modes:

  - ``"full"`` (default): entropy of the batch mean of the full ``K = 2^k``-way distributions,
    computed exactly from an ``[N, K]`` table (MAGVIT-v2's formulation; fine up to k≈13 at
    modest N). It also rewards decorrelated bits.
  - ``"bits"``: ``Σ_j H(mean_n p_nj)``, the per-bit factorisation Show-o's code uses (an upper
    bound of the full term that ignores correlations between bits; O(N·k) memory). Show-o
    averages over bits where we sum, so its value is ours divided by k.

  Entropies are in nats.
* Commitment: ``mean (z - stop_gradient(q))²``.
* PatchGAN hinge: ``d = mean relu(1 - D(x)) + mean relu(1 + D(x̂))``, ``g = -mean D(x̂)``.
* Metrics: PSNR and code-usage statistics (fraction of codes used, perplexity).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unif2ace_jax.models.tokenizer import lfq

ENTROPY_MODES = ("full", "bits")


def reconstruction_loss(images: jax.Array, recon: jax.Array, *, l1_weight: float = 1.0,
                        l2_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``images, recon: [B, H, W, C]`` -> (weighted scalar loss, {"l1", "l2"})."""
    diff = recon.astype(jnp.float32) - images.astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(diff))
    l2 = jnp.mean(jnp.square(diff))
    return l1_weight * l1 + l2_weight * l2, {"l1": l1, "l2": l2}


def _binary_entropy(log_p1: jax.Array, log_p0: jax.Array) -> jax.Array:
    return -(jnp.exp(log_p1) * log_p1 + jnp.exp(log_p0) * log_p0)


def lfq_entropy_terms(latents: jax.Array, *, temperature: float = 1.0,
                      mode: str = "full") -> tuple[jax.Array, jax.Array]:
    """(mean per-sample entropy, entropy of the batch-mean distribution), both scalars in nats.

    ``latents: [..., k]``; every leading position is one sample (token) of the batch.
    """
    if mode not in ENTROPY_MODES:
        raise ValueError(f"unknown LFQ entropy mode {mode!r}; expected one of {ENTROPY_MODES}")
    k = latents.shape[-1]
    z = latents.reshape(-1, k)
    log_p1, log_p0 = lfq.bit_log_probs(z, temperature)
    sample_entropy = jnp.mean(jnp.sum(_binary_entropy(log_p1, log_p0), axis=-1))
    if mode == "bits":
        n = z.shape[0]
        mean_log_p1 = jax.nn.logsumexp(log_p1, axis=0) - jnp.log(n)
        mean_log_p0 = jax.nn.logsumexp(log_p0, axis=0) - jnp.log(n)
        batch_entropy = jnp.sum(_binary_entropy(mean_log_p1, mean_log_p0))
    else:
        log_probs = lfq.code_log_probs(z, temperature)  # [N, K]
        mean_log_probs = jax.nn.logsumexp(log_probs, axis=0) - jnp.log(log_probs.shape[0])
        batch_entropy = -jnp.sum(jnp.exp(mean_log_probs) * mean_log_probs)
    return sample_entropy, batch_entropy


def lfq_entropy_loss(latents: jax.Array, *, temperature: float = 1.0,
                     mode: str = "full") -> jax.Array:
    """``mean per-sample entropy - batch entropy`` (scalar). ``latents: [..., k]``."""
    sample_entropy, batch_entropy = lfq_entropy_terms(latents, temperature=temperature, mode=mode)
    return sample_entropy - batch_entropy


def commitment_loss(latents: jax.Array, quantized: jax.Array) -> jax.Array:
    """``mean (z - stop_gradient(q))²``; pulls latents towards their ±1 codes."""
    q = jax.lax.stop_gradient(quantized.astype(jnp.float32))
    return jnp.mean(jnp.square(latents.astype(jnp.float32) - q))


def hinge_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """``mean relu(1 - D(real)) + mean relu(1 + D(fake))`` (scalar)."""
    return (jnp.mean(jax.nn.relu(1.0 - real_logits.astype(jnp.float32)))
            + jnp.mean(jax.nn.relu(1.0 + fake_logits.astype(jnp.float32))))


def hinge_generator_loss(fake_logits: jax.Array) -> jax.Array:
    """``-mean D(fake)`` (scalar)."""
    return -jnp.mean(fake_logits.astype(jnp.float32))


def psnr(images: jax.Array, recon: jax.Array, *,
         value_range: tuple[float, float] = (-1.0, 1.0)) -> jax.Array:
    """Per-image PSNR in dB. ``images, recon: [B, H, W, C]`` with values in `value_range`
    ((-1, 1) for model space, (0, 255) for uint8). Returns ``[B]``; recon is clipped first."""
    lo, hi = value_range
    x = images.astype(jnp.float32)
    y = jnp.clip(recon.astype(jnp.float32), lo, hi)
    mse = jnp.mean(jnp.square(x - y), axis=tuple(range(1, x.ndim)))
    return 10.0 * jnp.log10((hi - lo) ** 2 / jnp.maximum(mse, 1e-12))


def code_usage_stats(counts: np.ndarray) -> dict[str, float]:
    """Statistics of a code histogram ``counts: [K]``.

    Returns ``code_usage`` (fraction of the K codes used at least once) and ``code_perplexity``
    (``exp`` of the entropy of the empirical code distribution; K when all codes are equally
    frequent, 1 when a single code is used).
    """
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total <= 0:
        return {"code_usage": 0.0, "code_perplexity": 0.0}
    p = counts[counts > 0] / total
    return {"code_usage": float((counts > 0).mean()),
            "code_perplexity": float(np.exp(-(p * np.log(p)).sum()))}
