"""A config section = its module's ``default_config()`` updated with what a config gives.

Every configurable module owns one ``default_config()`` (an `ml_collections.ConfigDict` with
every field its builder reads); builders and config files call `with_defaults` on it, so a
config file states only what differs and a stored config (``run.json``) from before a field
existed still loads.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping

import ml_collections

from unif2ace_jax.errors import UserError


def _plain(x: Any) -> Any:
    if isinstance(x, ml_collections.ConfigDict):
        return x.to_dict()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    return x


def _merge(defaults: dict, given: Mapping, where: str, whole: frozenset[str]) -> dict:
    out = dict(defaults)
    for key, value in given.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in defaults:
            known = ", ".join(sorted(map(str, defaults)))
            raise UserError(f"unknown config field {path!r}; known: {known}")
        base = defaults[key]
        # A sub-section merges field by field, unless its fields are free-form (an empty
        # default such as `encoder_config`, or one named in `whole` such as `experts`).
        if (isinstance(base, dict) and base and isinstance(value, Mapping)
                and key not in whole and path not in whole):
            out[key] = _merge(base, value, path, whole)
        else:
            out[key] = _plain(value)
    return out


def with_defaults(defaults: ml_collections.ConfigDict, given: Mapping | None = None,
                  where: str = "", *, whole: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """A new ConfigDict: `defaults` updated with `given` (a ConfigDict, Frozen or not, or dict).

    A field of `given` that `defaults` lacks raises UserError naming ``<where>.<field>``.
    Sub-sections merge field by field, except those named in `whole` (a key, or a dotted path
    below `where`) and empty default sections: those take `given`'s value as it is.
    """
    merged = _merge(_plain(defaults), _plain(given or {}), where, frozenset(whole))
    return ml_collections.ConfigDict(merged)


def fill_missing(config: ml_collections.ConfigDict, defaults: dict) -> ml_collections.ConfigDict:
    """A copy of `config` holding every field of `defaults` (a nested dict) that it lacks,
    appended after its own fields, which win. Trainers then read their fields directly."""
    merged = copy.deepcopy(config)
    with merged.unlocked():
        _fill(merged, defaults)
    return merged


def _fill(section: ml_collections.ConfigDict, defaults: dict) -> None:
    for key, value in defaults.items():
        if key not in section:
            section[key] = value
        elif isinstance(value, dict) and isinstance(section[key], ml_collections.ConfigDict):
            _fill(section[key], value)
