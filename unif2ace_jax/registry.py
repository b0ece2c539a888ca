"""Small name → object registries, so configs pick components by name.

Example::

    ENCODERS = Registry("encoder")

    @ENCODERS.register("noise")
    class NoiseEncoder(nn.Module): ...

    cls = ENCODERS.get(config.encoder.name)   # clear error listing known names
"""

from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

from unif2ace_jax.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of components; `get` fails with the list of known names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UserError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: Any) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
