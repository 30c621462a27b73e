"""Field checks for validated configs: every error names the class and the field."""

from __future__ import annotations

import functools


def check_field(owner: str, cond: bool, field_name: str, message: str) -> None:
    """Raises ``ValueError("<owner>.<field_name>: <message>")`` unless ``cond``."""
    if not cond:
        raise ValueError(f"{owner}.{field_name}: {message}")


def field_checker(owner: str):
    """``check(cond, field_name, message)`` bound to ``owner`` (the config class's name)."""
    return functools.partial(check_field, owner)


def is_int(value, low: int) -> bool:
    """An int (not a bool) ``>= low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def is_number(value) -> bool:
    """An int or float (not a bool, not a string)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
