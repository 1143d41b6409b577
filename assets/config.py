"""Dagster run configs built from the product's config dataclasses, so each knob and its default is written once.

`dataclass_config` makes a Dagster `Config` exposing `names` of a dataclass (its annotation and default, in that
order), plus the asset's own switches; `to_dataclass` turns a run's config back into the dataclass.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pydantic
from dagster import Config


def dataclass_config(name: str, source: type, names: tuple[str, ...], module: str,
                     **switches: tuple[type, Any]) -> type[Config]:
    """A `Config` subclass named `name` with `source`'s fields `names` (type and default) and `switches`
    (name=(type, default)), in that order: the launchpad schema the hand-written class had."""
    hints = typing.get_type_hints(source)
    defaults = {f.name: f.default for f in dataclasses.fields(source)}
    fields: dict[str, Any] = {**{n: (hints[n], defaults[n]) for n in names}, **switches}
    return pydantic.create_model(name, __base__=Config, __module__=module, **fields)


def to_dataclass(config: Config, source: type, **overrides: Any) -> Any:
    """`source` built from the run config's fields it has (the rest keep their dataclass defaults)."""
    names = {f.name for f in dataclasses.fields(source)}
    return source(**{n: getattr(config, n) for n in type(config).model_fields if n in names}, **overrides)
