"""The exception type for invalid user configuration.

It carries the field, the value and the constraint separately, so the LLaMA-Factory layer can re-word the field with
its ``moe_`` spelling without parsing a message. Its base ``MoeError`` and the warning printer ``warn`` live in
``llamafactory_moe/errors.py`` (standard library only, so the CLI and the start-up hooks import them without torch)
and are re-exported here.
"""

from __future__ import annotations

from typing import Any

from ..errors import WARNING_PREFIX, MoeError, warn

__all__ = ["WARNING_PREFIX", "MoeConfigError", "MoeError", "check_bool", "check_choice", "check_float", "check_int",
           "warn"]


class MoeConfigError(MoeError, ValueError):
    """A configuration value is invalid. Raised before any model weights are loaded."""

    def __init__(self, field: str, value: Any, constraint: str, fix: str = "", method: str | None = None):
        self.field = field
        self.value = value
        self.constraint = constraint
        self.fix = fix
        self.method = method
        super().__init__(self.render())

    def render(self, field_name: str | None = None) -> str:
        name = field_name or self.field
        where = f" for `{self.method}`" if self.method else ""
        message = f"`{name}` ({self.value!r}) {self.constraint}{where}"
        return f"{message}; {self.fix}" if self.fix else message


def check_int(field: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
              method: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MoeConfigError(field, value, f"must be an integer, got {type(value).__name__}", method=method)
    if minimum is not None and value < minimum:
        raise MoeConfigError(field, value, f"must be >= {minimum}", method=method)
    if maximum is not None and value > maximum:
        raise MoeConfigError(field, value, f"must be <= {maximum}", method=method)


def check_float(field: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
                min_exclusive: bool = False, method: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MoeConfigError(field, value, f"must be a number, got {type(value).__name__}", method=method)
    if minimum is not None and (value <= minimum if min_exclusive else value < minimum):
        raise MoeConfigError(field, value, f"must be {'>' if min_exclusive else '>='} {minimum}", method=method)
    if maximum is not None and value > maximum:
        raise MoeConfigError(field, value, f"must be <= {maximum}", method=method)


def check_choice(field: str, value: Any, choices, *, method: str | None = None) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise MoeConfigError(field, value, f"must be one of {allowed}", method=method)


def check_bool(field: str, value: Any, *, method: str | None = None) -> None:
    if not isinstance(value, bool):
        raise MoeConfigError(field, value, f"must be true or false, got {type(value).__name__}", method=method)
