"""The event contract's rules, declared once as data (`event_rules`): turned into the GX suite that judges a
batch (data_contracts.events) and read one event at a time (`check_event`, the streaming job), so both agree
on what an event is and say why in the same words."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import pyarrow as pa

from data_contracts.gx_import import import_great_expectations
from data_contracts.schema import (DEVICE_TYPES, EVENT_COLUMNS, EVENT_SCHEMA, EVENT_TYPES, ITEM_EVENT_TYPES,
                                   SCHEMA_VERSION)


MAX_DWELL_MS = 3_600_000
DEFAULT_MAX_FUTURE_SKEW_MS = 300_000
MIN_TIMESTAMP_MS = 631_152_000_000  # 1990-01-01: older epoch ms are a unit bug (seconds, not ms), not history
MAX_ID_LENGTH = 256  # ids are keys in Redis and Delta: a megabyte "id" is an attack or a bug, never an id
ID_COLUMNS: tuple[str, ...] = ("event_id", "user_id", "session_id", "item_id")
INT_COLUMNS: list[str] = [f.name for f in EVENT_SCHEMA if pa.types.is_integer(f.type)]
# Without these the contract cannot judge a row at all, so their absence is a producer bug (ValueError).
REQUIRED_COLUMNS: tuple[str, ...] = ("event_id", "user_id", "item_id", "event_type", "timestamp", "session_id",
                                     "schema_version")
# Descriptive or nullable columns: when a source lacks them entirely they are added as nulls.
OPTIONAL_COLUMNS: tuple[str, ...] = tuple(c for c in EVENT_COLUMNS if c not in REQUIRED_COLUMNS)
# An empty string in these is as good as missing (no user is called "").
BLANK_IS_NULL: frozenset[str] = frozenset({"event_id", "user_id", "item_id", "event_type", "session_id"})
_UNREADABLE = "__unreadable"  # suffix of the flag column marking values that could not be coerced


# --------------------------------------------------------------------------- the rules, as data
@dataclass(frozen=True)
class Rule:
    """One expectation of the contract: a stable name, the GX expectation class and its arguments."""

    name: str
    expectation: str  # class name in gx.expectations
    kwargs: Mapping[str, Any]
    why: str
    # (column, values): the rule applies only to rows whose column holds one of `values` (the GX row_condition)
    when: tuple[str, tuple[Any, ...]] | None = None


def event_rules(now_ms: int, max_future_skew_ms: int = DEFAULT_MAX_FUTURE_SKEW_MS) -> list[Rule]:
    """The event contract. Names are stable: they are the quarantine reasons and the metric keys."""
    rules = [
        Rule(f"{col}_not_null", "ExpectColumnValuesToNotBeNull", {"column": col},
             f"an event without {col} cannot be attributed, joined or replayed")
        for col in ("event_id", "user_id", "session_id", "event_type", "timestamp", "schema_version")
    ]
    rules += [
        Rule(f"{col}_is_integer", "ExpectColumnValuesToBeNull", {"column": f"{col}{_UNREADABLE}"},
             f"{col} must be an int64 (or a string/float holding one); other values are not guessed at")
        for col in INT_COLUMNS
    ]
    item_types = sorted(ITEM_EVENT_TYPES)
    rules += [
        Rule("event_type_known", "ExpectColumnValuesToBeInSet",
             {"column": "event_type", "value_set": list(EVENT_TYPES)},
             "consumers switch on event_type; an unknown type would be silently ignored downstream"),
        Rule("timestamp_in_range", "ExpectColumnValuesToBeBetween",
             {"column": "timestamp", "min_value": MIN_TIMESTAMP_MS, "max_value": int(now_ms) + int(max_future_skew_ms)},
             "epoch ms after 1990 (older is a seconds-for-ms bug) and not ahead of the clock by more than the skew"),
        Rule("item_id_not_null_for_item_events", "ExpectColumnValuesToNotBeNull",
             {"column": "item_id", "row_condition": f"event_type in {item_types!r}", "condition_parser": "pandas"},
             "item events feed labels and item features; without the item they mean nothing",
             when=("event_type", tuple(item_types))),
        Rule("dwell_time_ms_in_range", "ExpectColumnValuesToBeBetween",
             {"column": "dwell_time_ms", "min_value": 0, "max_value": MAX_DWELL_MS},
             "negative or hour-long dwell is a client clock bug and would poison click labels"),
        Rule("position_non_negative", "ExpectColumnValuesToBeBetween",
             {"column": "position", "min_value": 0},
             "slate positions start at 0; position-bias features depend on it"),
        Rule("schema_version_current", "ExpectColumnValuesToBeInSet",
             {"column": "schema_version", "value_set": [SCHEMA_VERSION]},
             f"only schema version {SCHEMA_VERSION} is understood by this code"),
        Rule("device_type_known", "ExpectColumnValuesToBeInSet",
             {"column": "device_type", "value_set": list(DEVICE_TYPES)},
             "device_type is a model feature and a serving segment; an unknown device is a client bug"),
    ]
    rules += [
        Rule(f"{col}_length", "ExpectColumnValueLengthsToBeBetween",
             {"column": col, "min_value": 1, "max_value": MAX_ID_LENGTH},
             f"{col} is a key in Redis and Delta: at most {MAX_ID_LENGTH} characters")
        for col in ID_COLUMNS
    ]
    names = [r.name for r in rules]
    assert len(set(names)) == len(names), f"duplicate rule names: {names}"
    return rules


def build_suite(rules: list[Rule], name: str = "kairos_events") -> Any:
    """A GX ExpectationSuite with one expectation per rule; the rule name travels in `meta`."""
    gx = import_great_expectations()

    suite = gx.ExpectationSuite(name=name)
    for rule in rules:
        cls = getattr(gx.expectations, rule.expectation)
        suite.add_expectation(cls(**rule.kwargs, meta={"kairos_rule": rule.name}, notes=rule.why))
    return suite


# --------------------------------------------------------------------------- the same rules, one event at a time
_STRING_COLUMNS: tuple[str, ...] = tuple(f.name for f in EVENT_SCHEMA if pa.types.is_string(f.type))


def _event_int(value: Any) -> int | None:
    """A JSON number holding an int64 (42, 42.0), else None. NaN, Infinity, booleans and strings are not:
    the stream takes JSON numbers for integer fields (the batch also reads strings, see _coerce_ints)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if -2**63 <= value < 2**63 else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 2.0**63:
        return int(value)
    return None


def _event_value(event: Mapping[str, Any], column: str) -> Any:
    """The value a rule sees for one event: as the batch frame would hold it (blank id -> null, int columns
    as ints or null; an unreadable int is null here and flagged by its `_is_integer` rule)."""
    value = event.get(column)
    if column in INT_COLUMNS:
        return _event_int(value)
    if isinstance(value, str) and column in BLANK_IS_NULL and not value.strip():
        return None
    return value


def _rule_fails(rule: Rule, event: Mapping[str, Any]) -> bool:
    """Whether one event breaks one rule, read the way the GX expectation reads a row (nulls pass the
    set, range and length checks; the not-null rules catch them)."""
    if rule.when is not None and event.get(rule.when[0]) not in rule.when[1]:
        return False
    column = rule.kwargs["column"]
    if rule.expectation == "ExpectColumnValuesToBeNull" and column.endswith(_UNREADABLE):
        raw = event.get(column[: -len(_UNREADABLE)])
        if raw is None or (isinstance(raw, float) and math.isnan(raw)) or raw == "":
            return False  # missing, as in the batch frame (NaN is pandas' null): the not-null rules judge it
        return _event_int(raw) is None
    value = _event_value(event, column)
    if rule.expectation == "ExpectColumnValuesToNotBeNull":
        return value is None
    if value is None:
        return False
    if rule.expectation == "ExpectColumnValuesToBeInSet":
        return value not in rule.kwargs["value_set"]
    if rule.expectation == "ExpectColumnValuesToBeBetween":
        low, high = rule.kwargs.get("min_value"), rule.kwargs.get("max_value")
        return (low is not None and value < low) or (high is not None and value > high)
    if rule.expectation == "ExpectColumnValueLengthsToBeBetween":
        n = len(str(value))
        return n < rule.kwargs.get("min_value", 0) or n > rule.kwargs.get("max_value", n)
    raise NotImplementedError(f"rule {rule.name}: {rule.expectation} has no per-event reading; add it here")


def _describe(rule: Rule, event: Mapping[str, Any]) -> str:
    """'<rule>: <field> <value> <what was expected>' for the producer (values cut at 80 characters)."""
    column = rule.kwargs["column"].removesuffix(_UNREADABLE)
    shown = repr(event.get(column))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    if rule.expectation == "ExpectColumnValuesToBeInSet":
        expected = f"is not one of {list(rule.kwargs['value_set'])}"
    elif rule.expectation == "ExpectColumnValuesToBeBetween":
        expected = f"is outside [{rule.kwargs.get('min_value')}, {rule.kwargs.get('max_value', '')}]"
    elif rule.expectation == "ExpectColumnValueLengthsToBeBetween":
        expected = f"has {len(str(event.get(column)))} characters, more than {rule.kwargs['max_value']}"
    elif rule.name.endswith("_is_integer"):
        expected = "is not a whole JSON number (NaN, Infinity, strings and booleans are refused)"
    else:
        expected = "is missing or empty"
    return f"{rule.name}: {column} {shown} {expected}"


def event_violations(event: Any, rules: list[Rule]) -> list[tuple[str, str]]:
    """(field, reason) for every rule of the contract one event (a decoded JSON object) breaks, in rule order.

    The streaming intake and the streaming job judge each event with this, over the very rule list the
    batch contract turns into a GX suite (`event_rules`): one definition of a valid event, so the stream
    never accepts what silver would quarantine. Two checks come first because a JSON object can break
    them and a typed batch frame cannot: not an object at all, and a string column holding a non-string."""
    if not isinstance(event, Mapping):
        return [("event", "event is not a JSON object")]
    out = [(col, f"{col}_is_string: {col} must be a JSON string, got {type(event[col]).__name__}")
           for col in _STRING_COLUMNS if event.get(col) is not None and not isinstance(event[col], str)]
    bad_types = {col for col, _ in out}
    for rule in rules:
        column = rule.kwargs["column"].removesuffix(_UNREADABLE)
        if column in bad_types or not _rule_fails(rule, event):
            continue
        out.append((column, _describe(rule, event)))
    return out


def check_event(event: Any, now_ms: int | None = None, max_future_skew_ms: int = DEFAULT_MAX_FUTURE_SKEW_MS,
                rules: list[Rule] | None = None) -> tuple[str, str] | None:
    """None if the event passes the contract, else (field, reason) of the first rule it breaks (all broken
    rule names are in the reason, "; "-joined, like the batch quarantine's `reasons`)."""
    if rules is None:
        rules = event_rules(int(time.time() * 1000) if now_ms is None else int(now_ms), max_future_skew_ms)
    found = event_violations(event, rules)
    if not found:
        return None
    return found[0][0], "; ".join(reason for _, reason in found)
