"""Dagster run configs built from the product's config dataclasses, so each knob and its default is written once.

`dataclass_config` makes a Dagster `Config` exposing fields of a dataclass (its annotation and default, in the order
given), plus the asset's own switches; `to_dataclass` turns a run's config back into the dataclass. A `Knob` declares
a launchpad field that is not a same-named field: another unit (seconds for `_ms`: the default is derived, the value
scaled back), a field of a nested dataclass ("bots.window_ms"), a sentinel for None, a deliberate asset default, or an
asset-only switch in its place in the launchpad.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pydantic
from dagster import Config

class _Derived:
    """`Knob.default` not given: the launchpad default is the dataclass field's, in the knob's unit."""

    def __repr__(self) -> str:
        return "<from the dataclass>"


_UNSET: Any = _Derived()


@dataclasses.dataclass(frozen=True)
class Knob:
    """One launchpad field. `path`: the dataclass field it sets (dotted into a nested dataclass; None = an asset-only
    switch, then `type` and `default` are required); launchpad value * `scale` = dataclass value; `type`: the
    launchpad type when it differs from the field's; `default`: the asset's own default where it deliberately differs
    from the dataclass's (else derived from it); `none_below`: launchpad values below it mean the field's None
    (whose launchpad default is then `none_below - 1`)."""

    name: str
    path: str | None = ""
    scale: float = 1
    type: Any = None
    default: Any = _UNSET
    none_below: float | None = None

    @property
    def field(self) -> str | None:
        return self.name if self.path == "" else self.path


def _as_knob(entry: str | Knob) -> Knob:
    return entry if isinstance(entry, Knob) else Knob(entry)


def _walk(source: type, path: str) -> tuple[Any, Any]:
    """(type hint, default) of the dataclass field `path` ("bots.window_ms": BotConfig's, as RefineConfig builds it)."""
    head, _, rest = path.partition(".")
    hint = typing.get_type_hints(source)[head]
    field = {f.name: f for f in dataclasses.fields(source)}[head]
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[operator]
    if not rest:
        return hint, default
    for part in rest.split("."):  # the parent's own default instance may set the nested field
        default = getattr(default, part)
    return _walk(hint, rest)[0], default


def _launchpad_field(source: type, knob: Knob) -> tuple[Any, Any]:
    """(type, default) the launchpad shows for `knob`: the dataclass field's, in the knob's unit and sentinel."""
    if knob.field is None:
        return knob.type, knob.default
    hint, default = _walk(source, knob.field)
    kind = knob.type or hint
    if knob.default is not _UNSET:
        return kind, knob.default
    if default is None and knob.none_below is not None:
        return kind, kind(knob.none_below - 1)
    shown = default / knob.scale if knob.scale != 1 else default
    if kind is int and shown != int(shown):
        raise ValueError(f"{knob.name}: {source.__name__}.{knob.field} = {default} is not whole in its launchpad unit")
    return kind, kind(shown) if kind in (int, float) else shown


_KNOBS: dict[type, tuple[Knob, ...]] = {}


def dataclass_config(name: str, source: type, names: tuple[str | Knob, ...], module: str, doc: str | None = None,
                     **switches: tuple[type, Any]) -> type[Config]:
    """A `Config` subclass named `name` (docstring `doc`: the launchpad's description) with `names` (a field of
    `source` by name, or a `Knob`) and then `switches` (name=(type, default)), in that order: the launchpad schema
    the hand-written class had."""
    knobs = tuple(_as_knob(n) for n in names) + tuple(Knob(k, None, type=t, default=d) for k, (t, d) in switches.items())
    fields: dict[str, Any] = {k.name: _launchpad_field(source, k) for k in knobs}
    model = pydantic.create_model(name, __base__=Config, __module__=module, __doc__=doc, **fields)
    _KNOBS[model] = knobs
    return model


def _dataclass_value(source: type, knob: Knob, value: Any) -> Any:
    """The launchpad `value` in the dataclass field's unit and type (int fields truncate, as `int(hours * ms)`)."""
    assert knob.field is not None
    if knob.none_below is not None and value < knob.none_below:
        return None
    hint, _ = _walk(source, knob.field)
    scaled = value * knob.scale if knob.scale != 1 else value
    return int(scaled) if hint is int else scaled


def _nest(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Dotted field values split into this level's fields and, per nested dataclass field, its own values."""
    flat = {k: v for k, v in values.items() if "." not in k}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if "." in key:
            head, _, rest = key.partition(".")
            nested.setdefault(head, {})[rest] = value
    return flat, nested


def _replace(instance: Any, values: dict[str, Any]) -> Any:
    flat, nested = _nest(values)
    return dataclasses.replace(instance, **flat, **{h: _replace(getattr(instance, h), sub) for h, sub in nested.items()})


def _build(source: type, values: dict[str, Any]) -> Any:
    """`source` from dotted field values: a nested dataclass is its field's default with the values set (the rest,
    and every other field, keep their defaults)."""
    flat, nested = _nest(values)
    return source(**flat, **{h: _replace(_walk(source, h)[1], sub) for h, sub in nested.items()})


def to_dataclass(config: Config, source: type, **overrides: Any) -> Any:
    """`source` built from the run config's knobs that set its fields (the rest keep their dataclass defaults)."""
    knobs = _KNOBS.get(type(config)) or tuple(Knob(n) for n in type(config).model_fields)
    top = {f.name for f in dataclasses.fields(source)}
    values = {k.field: _dataclass_value(source, k, getattr(config, k.name)) for k in knobs
              if k.field is not None and k.field.split(".")[0] in top}
    return _build(source, {**values, **overrides})
