"""What every config rule shares: the error that lists a config's problems, and the predicates
the owners of its fields check their values with. Imports nothing of msn, so any module can."""

from __future__ import annotations

import numbers

from omegaconf.errors import MissingMandatoryValue


class ConfigError(ValueError):
    """The config is invalid; ``problems`` lists every rule it breaks."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        if len(problems) == 1:  # one line for one problem
            super().__init__(f"invalid configuration: {problems[0]}")
        else:
            super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def error_message(err: Exception) -> str:
    """The ``error: ...`` line of a command-line entry for a config problem or a missing value."""
    if isinstance(err, MissingMandatoryValue):
        return f"{err.full_key} is required (give {err.full_key}=...)"
    return str(err)


def is_int(value: object) -> bool:
    """An integer, but not a bool: ``True`` in a config is a mistake, not 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A real number, but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def int_problems(name: str, value: object, minimum: int) -> list[str]:
    """``[]`` when ``value`` is an integer >= ``minimum``, else the one problem naming ``name``."""
    if is_int(value) and value >= minimum:  # type: ignore[operator]
        return []
    return [f"{name} must be an integer >= {minimum}, got {value!r}"]


def raise_problems(problems: list[str], prefix: str = "") -> None:
    """A ValueError listing every problem (each after ``prefix``); nothing when there is none."""
    if problems:
        raise ValueError("; ".join(prefix + p for p in problems))


def own_arguments(local_vars: dict[str, object]) -> dict[str, object]:
    """A constructor's arguments from its ``locals()`` taken before it binds anything else, so
    that its ``problems(**own_arguments(locals()))`` call cannot forget one."""
    return {k: v for k, v in local_vars.items() if k not in ("self", "__class__")}
