"""Config checks shared by the plugin configs: numbers are numbers, not booleans (finite floats come from
``ConfigDict(allow_inf_nan=False)`` on the base classes)."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel

__all__ = ["refuse_bool_numbers"]


def _numbers_only(annotation: Any) -> bool:
    """Whether a field of this type takes numbers only (int, float, their Optional/Union, int Literals)."""
    if annotation in (int, float):
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return bool(args) and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if origin is typing.Annotated:
        return _numbers_only(args[0])
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        return bool(members) and all(_numbers_only(a) for a in members)
    return False


def refuse_bool_numbers(cls: type[BaseModel], data: Any) -> Any:
    """A ``model_validator(mode="before")`` body: ``True``/``False`` given for an int or float field is an error
    (pydantic would read it as 1/0), named with the field."""
    if isinstance(data, dict):
        for name, value in data.items():
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            if field is not None and isinstance(value, bool) and _numbers_only(field.annotation):
                raise ValueError(f"{name}={value!r}: a boolean is not a number; give {name} as a number")
    return data
