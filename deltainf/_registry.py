"""Name -> class lookup shared by the detector and unlearning-method registries."""
from __future__ import annotations

from typing import Mapping


def lookup(name: str, registry: Mapping[str, type], aliases: Mapping[str, str], what: str) -> type:
    """The class registered under ``name`` (case-insensitive, '-' = '_', or an alias); ``what`` names the
    kind of thing in error messages. Raises TypeError for a non-string, ValueError for an unknown name."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected the name of a {what} (str), got {type(name).__name__}")
    key = name.strip().lower().replace("-", "_")
    key = aliases.get(key, key)
    if key not in registry:
        raise ValueError(f"name: unknown {what} {name!r}; valid names: {sorted(registry)} "
                         f"(aliases: {sorted(aliases)})")
    return registry[key]
