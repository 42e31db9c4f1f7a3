"""The ``key=value`` arguments of the benchmark scripts (throughput.py, memory.py,
decode_pipeline.py): every key one of the defaults, every value of its default's type."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def dataclass_defaults(cls: type) -> dict[str, Any]:
    """``{field: default}`` of a dataclass of settings."""
    return {f.name: f.default for f in dataclasses.fields(cls)}


def parse_key_values(argv: list[str], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The given ``key=value`` pairs, each value converted to the type of its key's default; one
    line (``SystemExit``) for a malformed argument, an unknown key or a value of the wrong type."""
    given: dict[str, Any] = {}
    for arg in argv:
        key, sep, raw = arg.partition("=")
        if not sep or key not in defaults:
            raise SystemExit(f"expected key=value with a key of {sorted(defaults)}, got {arg!r}")
        kind = type(defaults[key])
        try:
            given[key] = kind(raw)
        except ValueError:
            raise SystemExit(f"{key}={raw!r}: expected a {kind.__name__}") from None
    return given
