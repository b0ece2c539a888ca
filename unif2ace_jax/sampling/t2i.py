"""Model-level text-to-image sampling: captions -> image codes -> images (docs/DESIGN.md §7).

`sample_codes` is one jitted function: it lays out the T2I prompts ``<t2i> <bos> caption <eos>
<soi> [MASK]… <eoi>`` (with classifier-free guidance: the B conditional prompts and B prompts with
an empty caption, stacked into one batch of 2B, so cond and uncond run in one forward pass), and
runs a registered sampler (`T2I_SAMPLERS`: ``maskgit`` or ``ancestral``) whose every step is one
backbone pass producing logits over the K image codes.

`generate_images` is the host wrapper used by the CLIs: text prompts -> token ids -> codes ->
image-tokenizer decode -> uint8 images, in fixed-size chunks (one compilation).

``config.sampling.prompt_format = "showo"`` (converted Show-o weights) lays the prompts out as
Show-o does instead (`sequences.showo_t2i_rows`: its ``<bos>`` and truncation rules, text part
``data.max_text_len + 3`` wide = Show-o's ``max_seq_length + 1``, the empty-text unconditional
row, Show-o's attention mask), see `sample_codes_showo`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unif2ace_jax.errors import UserError, check_shape
from unif2ace_jax.models.encoders import ENCODERS
from unif2ace_jax.models.moe.seq_moe import dummy_features, feature_keys
from unif2ace_jax.models.sequences import (PROMPT_FORMATS, TASK_T2I, build_t2i_prompt,
                                          showo_prompt, showo_t2i_rows)
from unif2ace_jax.models.unified import UnifiedModel, default_features
from unif2ace_jax.sampling import T2I_SAMPLERS
from unif2ace_jax.sampling.guidance import guided_logits, paired_forward
from unif2ace_jax.sampling.maskgit import REMASK_RULES, TEMPERATURE_ANNEALINGS
from unif2ace_jax.utils.defaults import with_defaults

SAMPLERS = ("maskgit", "ancestral")


def default_config() -> ml_collections.ConfigDict:
    """Every field of ``config.sampling`` (the defaults of generate, evaluate and ask).

    ``max_answer_tokens``: most answer tokens of a VQA answer (0 = ``data.max_answer_len + 1``).
    ``prompt_format``: ``unif2ace`` or ``showo`` (Show-o's T2I / MMU prompts and masks, for
    converted Show-o weights). ``temperature_annealing`` / ``remask_rule``: MaskGIT options
    (`sampling.maskgit`; ``showo_compound`` / ``showo`` are Show-o's ``t2i_generate``).
    """
    return ml_collections.ConfigDict(dict(
        sampler="maskgit", steps=16, guidance=1.75, noise_temperature=1.0,
        sample_temperature=1.0, schedule="cosine", max_answer_tokens=0,
        prompt_format="unif2ace", temperature_annealing="linear", remask_rule="unif2ace"))


def sampling_options(config: ml_collections.ConfigDict, *, sampler: str | None = None,
                     steps: int | None = None, guidance: float | None = None,
                     max_answer_tokens: int | None = None) -> ml_collections.ConfigDict:
    """The sampler settings of a run: `default_config` updated with its ``config.sampling``,
    then with the options given here (None = the config's); ``max_answer_tokens`` resolved."""
    opts = with_defaults(default_config(), config.get("sampling", None), "sampling")
    given = dict(sampler=sampler or None, steps=steps, guidance=guidance,
                 max_answer_tokens=max_answer_tokens)
    opts.update({k: v for k, v in given.items() if v is not None})
    opts.steps, opts.guidance = int(opts.steps), float(opts.guidance)
    opts.noise_temperature = float(opts.noise_temperature)
    opts.sample_temperature = float(opts.sample_temperature)
    opts.max_answer_tokens = int(opts.max_answer_tokens or int(config.data.max_answer_len) + 1)
    for key, known in (("prompt_format", PROMPT_FORMATS),
                       ("temperature_annealing", TEMPERATURE_ANNEALINGS),
                       ("remask_rule", REMASK_RULES)):
        if opts[key] not in known:
            raise UserError(f"unknown sampling.{key} {opts[key]!r}; known: {', '.join(known)}")
    return opts


def generate_kwargs(opts: ml_collections.ConfigDict) -> dict[str, Any]:
    """`generate_codes` keyword arguments from `sampling_options`."""
    return dict(sampler=opts.sampler, num_steps=opts.steps, guidance=opts.guidance,
                noise_temperature=opts.noise_temperature,
                sample_temperature=opts.sample_temperature, schedule=opts.schedule,
                temperature_annealing=opts.temperature_annealing,
                remask_rule=opts.remask_rule)


def _sampler_kwargs(sampler: str, noise_temperature: Any, sample_temperature: Any,
                    temperature_annealing: str = "linear", remask_rule: str = "unif2ace") -> dict:
    if sampler == "maskgit":
        out = {"noise_temperature": noise_temperature, "sample_temperature": sample_temperature}
        if (temperature_annealing, remask_rule) != ("linear", "unif2ace"):
            out.update(temperature_annealing=temperature_annealing, remask_rule=remask_rule)
        return out
    if (temperature_annealing, remask_rule) != ("linear", "unif2ace"):
        raise UserError(f"sampling.temperature_annealing / remask_rule are MaskGIT options; "
                        f"the {sampler} sampler takes neither")
    return {"temperature": sample_temperature}


def absent_features(model: UnifiedModel, rows: int) -> dict[str, jax.Array]:
    """Stand-ins for the image features a caption lacks (T2I from text has no image).

    For every feature expert of the model's seq-MoE that reads a frozen encoder's output
    (``clip``, ``face``; not the in-model ``noise``): zeros ``[rows, feature_dim]`` and
    ``<feature_key>_present = False`` (the router cannot pick the expert). The gen group does not
    hold these experts, but the seq-MoE runs every expert on every row, so the inputs must exist.
    Empty for models without a seq-MoE.
    """
    cfg = model.backbone.seq_moe
    if cfg.get("name", "none") == "none":
        return {}
    needed = [k for k, enc in feature_keys(cfg).items() if not ENCODERS.get(enc).in_model]
    if not needed:
        return {}
    zeros = dummy_features(cfg, rows)
    out = {k: zeros[k] for k in needed}
    out.update({f"{k}_present": jnp.zeros((rows,), bool) for k in needed})
    return out


def _t2i_logits_fn(model: UnifiedModel, params: Any, prompt, use_guidance: bool):
    """The samplers' ``codes [B, N] -> logits`` (a cond/uncond pair with guidance) for a T2I
    prompt dict of B rows, or 2B (conditional rows first) with guidance."""
    rows = prompt["tokens"].shape[0]
    # mask_ratio here is a placeholder: `code_logits_fn` replaces it at every step by the
    # fraction of still-masked codes of each row (the noise level the noise expert sees).
    features = default_features(jnp.full((rows,), TASK_T2I, jnp.int32),
                                jnp.ones((rows,), jnp.float32), absent_features(model, rows))
    logits_fn = model.code_logits_fn(params, prompt, features)
    if use_guidance:
        logits_fn = paired_forward(logits_fn)
    return logits_fn


def _run_sampler(model: UnifiedModel, params: Any, prompt, rng, b: int, guidance,
                 noise_temperature, sample_temperature, *, sampler: str, num_steps: int,
                 use_guidance: bool, schedule: str, temperature_annealing: str = "linear",
                 remask_rule: str = "unif2ace"):
    n, k = model.num_image_tokens, model.num_image_codes
    logits_fn = _t2i_logits_fn(model, params, prompt, use_guidance)
    init = jnp.full((b, n), k, jnp.int32)
    return T2I_SAMPLERS.get(sampler)(
        rng, logits_fn, init, mask_id=k, num_steps=num_steps, guidance=guidance,
        schedule=schedule, **_sampler_kwargs(sampler, noise_temperature, sample_temperature,
                                             temperature_annealing, remask_rule))


@functools.partial(jax.jit, static_argnames=("model", "sampler", "num_steps", "text_width",
                                             "use_guidance", "schedule",
                                             "temperature_annealing", "remask_rule"))
def _sample_codes(params, caption, caption_len, rng, guidance, noise_temperature,
                  sample_temperature, *, model: UnifiedModel, sampler: str, num_steps: int,
                  text_width: int, use_guidance: bool, schedule: str,
                  temperature_annealing: str = "linear", remask_rule: str = "unif2ace"):
    b = caption.shape[0]
    n = model.num_image_tokens
    if use_guidance:
        caption2 = jnp.concatenate([caption, caption], axis=0)
        len2 = jnp.concatenate([caption_len, caption_len], axis=0)
        drop = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
    else:
        caption2, len2, drop = caption, caption_len, jnp.zeros((b,), bool)
    prompt = build_t2i_prompt(caption2, len2, model.vocab, num_image_tokens=n,
                              text_width=text_width, drop_caption=drop,
                              group_assignment=model.group_assignment,
                              position_mode=model.position_mode)
    return _run_sampler(model, params, prompt, rng, b, guidance, noise_temperature,
                        sample_temperature, sampler=sampler, num_steps=num_steps,
                        use_guidance=use_guidance, schedule=schedule,
                        temperature_annealing=temperature_annealing, remask_rule=remask_rule)


def sample_codes(model: UnifiedModel, params: Any, caption: jax.Array, caption_len: jax.Array,
                 rng: jax.Array, *, sampler: str = "maskgit", num_steps: int = 16,
                 guidance: float = 1.75, noise_temperature: float = 1.0,
                 sample_temperature: float = 1.0, schedule: str = "cosine",
                 text_width: int | None = None, temperature_annealing: str = "linear",
                 remask_rule: str = "unif2ace") -> jax.Array:
    """Image codes for captions.

    Args:
      model, params: the unified model and its (unboxed) params.
      caption: ``[B, Lt]`` right-padded text ids; caption_len: ``[B]`` (0 = unconditional).
      sampler: ``maskgit`` | ``ancestral``; num_steps: T.
      guidance: CFG weight w (``(1+w) cond - w uncond``); 0 runs no unconditional pass.
      noise_temperature: MaskGIT confidence-noise temperature; sample_temperature: temperature
        of the code draws (the ancestral sampler's only temperature).
      text_width: width of the prompt's left-padded text part (default: the training layout
        ``Lt + 3``; any width gives the same result with ``position_mode="valid"``).
      temperature_annealing, remask_rule: MaskGIT options (`sampling.maskgit`).

    Returns ``codes [B, N]`` int32 in ``[0, K)``.
    """
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    if num_steps < 1:
        raise UserError(f"steps must be >= 1, got {num_steps}")
    caption = jnp.asarray(caption, jnp.int32)
    check_shape("caption ids", caption, ("B", "Lt"))
    width = caption.shape[1] + 3 if text_width is None else int(text_width)
    return _sample_codes(params, caption, jnp.asarray(caption_len, jnp.int32), rng,
                         jnp.float32(guidance), jnp.float32(noise_temperature),
                         jnp.float32(sample_temperature), model=model, sampler=sampler,
                         num_steps=int(num_steps), text_width=width,
                         use_guidance=float(guidance) != 0.0, schedule=schedule,
                         temperature_annealing=temperature_annealing, remask_rule=remask_rule)


# ---------------------------------------------------------------------------------------------
# Show-o's prompts (prompt_format="showo")


def showo_t2i_tokens(tokenizer, prompts: Sequence[str], vocab, *, max_text_len: int,
                     num_image_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows [B, L], uncond_row [L])``: Show-o's T2I rows of `prompts` (fully masked image)
    and of the empty text (its CFG row), int32, ``L = max_text_len + N + 2``."""
    ids = [tokenizer.encode(p) for p in prompts]
    rows = showo_t2i_rows(ids, vocab, max_text_len=max_text_len,
                          num_image_tokens=num_image_tokens)
    uncond = showo_t2i_rows([[]], vocab, max_text_len=max_text_len,
                            num_image_tokens=num_image_tokens)[0]
    return rows, uncond


def _showo_prompt(model: UnifiedModel, rows, uncond_row, use_guidance: bool):
    if use_guidance:
        rows = jnp.concatenate([rows, jnp.broadcast_to(uncond_row, rows.shape)], axis=0)
    return showo_prompt(rows, model.vocab, task=TASK_T2I, num_image_tokens=model.num_image_tokens,
                        group_assignment=model.group_assignment,
                        position_mode=model.position_mode)


@functools.partial(jax.jit, static_argnames=("model", "use_guidance"))
def showo_step_logits(params, rows, uncond_row, codes, guidance, *, model: UnifiedModel,
                      use_guidance: bool) -> jax.Array:
    """The guided logits ``[B, N, K]`` float32 a sampler step of `sample_codes_showo` sees for
    the canvas ``codes [B, N]`` (K = mask): ``(1+w) cond - w uncond`` with guidance."""
    prompt = _showo_prompt(model, rows, uncond_row, use_guidance)
    return guided_logits(_t2i_logits_fn(model, params, prompt, use_guidance)(codes), guidance)


@functools.partial(jax.jit, static_argnames=("model", "sampler", "num_steps", "use_guidance",
                                             "schedule", "temperature_annealing",
                                             "remask_rule"))
def _sample_codes_showo(params, rows, uncond_row, rng, guidance, noise_temperature,
                        sample_temperature, *, model, sampler, num_steps, use_guidance,
                        schedule, temperature_annealing, remask_rule):
    prompt = _showo_prompt(model, rows, uncond_row, use_guidance)
    return _run_sampler(model, params, prompt, rng, rows.shape[0], guidance, noise_temperature,
                        sample_temperature, sampler=sampler, num_steps=num_steps,
                        use_guidance=use_guidance, schedule=schedule,
                        temperature_annealing=temperature_annealing, remask_rule=remask_rule)


def sample_codes_showo(model: UnifiedModel, params: Any, rows: np.ndarray,
                       uncond_row: np.ndarray, rng: jax.Array, *, sampler: str = "maskgit",
                       num_steps: int = 16, guidance: float = 1.75,
                       noise_temperature: float = 1.0, sample_temperature: float = 1.0,
                       schedule: str = "cosine", temperature_annealing: str = "showo_compound",
                       remask_rule: str = "showo") -> jax.Array:
    """Image codes ``[B, N]`` for Show-o T2I rows (`showo_t2i_tokens`), as ``t2i_generate``:
    the cond rows and B copies of the unconditional row in one pass, guidance
    ``(1+w) cond - w uncond``, Show-o's mask; the sampler options as in `sample_codes`."""
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    if num_steps < 1:
        raise UserError(f"steps must be >= 1, got {num_steps}")
    return _sample_codes_showo(
        params, jnp.asarray(rows, jnp.int32), jnp.asarray(uncond_row, jnp.int32), rng,
        jnp.float32(guidance), jnp.float32(noise_temperature), jnp.float32(sample_temperature),
        model=model, sampler=sampler, num_steps=int(num_steps),
        use_guidance=float(guidance) != 0.0, schedule=schedule,
        temperature_annealing=temperature_annealing, remask_rule=remask_rule)


def _generate_showo(trained, texts: Sequence[str], opts, *, seed: int, chunk: int) -> np.ndarray:
    """`generate_codes` for ``prompt_format="showo"``: chunk c uses ``fold_in(key(seed), c)``."""
    model = trained.model
    rows, uncond = showo_t2i_tokens(trained.text_tokenizer, texts, model.vocab,
                                    max_text_len=showo_max_text_len(trained.config),
                                    num_image_tokens=model.num_image_tokens)
    kwargs = generate_kwargs(opts)
    total = rows.shape[0]
    chunk = max(1, min(chunk, total))
    out = []
    for c, start in enumerate(range(0, total, chunk)):
        part = rows[start:start + chunk]
        n = part.shape[0]
        if n < chunk:
            part = np.concatenate([part, np.broadcast_to(uncond, (chunk - n, uncond.shape[0]))])
        rng = jax.random.fold_in(jax.random.key(seed), c)
        out.append(np.asarray(sample_codes_showo(model, trained.params, part, uncond, rng,
                                                 **kwargs))[:n])
    return np.concatenate(out)


def showo_max_text_len(config: ml_collections.ConfigDict) -> int:
    """Show-o's ``max_text_len`` (``max_seq_length + 1``): the text part of a T2I row,
    ``data.max_text_len + 3`` as for the project's own prompts."""
    return int(config.data.max_text_len) + 3


def encode_texts(tokenizer, texts: Sequence[str], width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [B, width] right-padded with 0, lengths [B])``, each text truncated to `width`."""
    ids = np.zeros((len(texts), width), np.int32)
    lengths = np.zeros((len(texts),), np.int32)
    for i, text in enumerate(texts):
        row = list(tokenizer.encode(text))[:width]
        ids[i, :len(row)] = row
        lengths[i] = len(row)
    return ids, lengths


def generate_codes(model: UnifiedModel, params: Any, caption: np.ndarray,
                   caption_len: np.ndarray, *, seed: int = 0, chunk: int = 32,
                   **kwargs) -> np.ndarray:
    """`sample_codes` over any number of captions in chunks of `chunk` rows (the last chunk is
    padded, so one compilation serves all). Chunk c uses ``fold_in(key(seed), c)``.
    Returns int32 ``[B, N]`` on the host."""
    caption = np.asarray(caption, np.int32)
    caption_len = np.asarray(caption_len, np.int32)
    total = caption.shape[0]
    chunk = max(1, min(chunk, total))
    out = []
    for c, start in enumerate(range(0, total, chunk)):
        ids = caption[start:start + chunk]
        lens = caption_len[start:start + chunk]
        n = ids.shape[0]
        if n < chunk:
            ids = np.concatenate([ids, np.zeros((chunk - n, ids.shape[1]), np.int32)])
            lens = np.concatenate([lens, np.zeros((chunk - n,), np.int32)])
        rng = jax.random.fold_in(jax.random.key(seed), c)
        codes = sample_codes(model, params, ids, lens, rng, **kwargs)
        out.append(np.asarray(codes)[:n])
    return np.concatenate(out) if out else np.zeros((0, model.num_image_tokens), np.int32)


def codes_to_images(image_tokenizer, codes: np.ndarray, grid: int) -> np.ndarray:
    """Image codes ``[B, N]`` (row-major ``h*w``) -> uint8 images via the tokenizer's decoder."""
    codes = np.asarray(codes, np.int32)
    return image_tokenizer.decode(codes.reshape(codes.shape[0], grid, grid))


def generate_images(trained, prompts: Sequence[str], *, num_per_prompt: int = 1, seed: int = 0,
                    sampler: str | None = None, steps: int | None = None,
                    guidance: float | None = None, chunk: int = 32) -> np.ndarray:
    """uint8 images ``[len(prompts) * num_per_prompt, H, W, 3]`` (prompt-major order).

    `trained` is a `checkpoint.trained.Trained`; unset options come from its ``config.sampling``.
    """
    if not prompts:
        raise UserError("no prompt given")
    if num_per_prompt < 1:
        raise UserError(f"--num must be >= 1, got {num_per_prompt}")
    opts = sampling_options(trained.config, sampler=sampler, steps=steps, guidance=guidance)
    width = int(trained.config.data.max_text_len)
    texts = [p for p in prompts for _ in range(num_per_prompt)]
    image_tokenizer = trained.image_tokenizer  # fail early when there is none
    if opts.prompt_format == "showo":
        codes = _generate_showo(trained, texts, opts, seed=seed, chunk=chunk)
        return codes_to_images(image_tokenizer, codes, trained.model.image_grid)
    ids, lens = encode_texts(trained.text_tokenizer, texts, width)
    codes = generate_codes(
        trained.model, trained.params, ids, lens, seed=seed, chunk=chunk,
        **generate_kwargs(opts))
    return codes_to_images(image_tokenizer, codes, trained.model.image_grid)
