"""The event contract: Great Expectations decides which raw events reach silver.

The rules are declared once, as data (`event_rules`), and turned into a GX
ExpectationSuite; GX validates the whole batch with result_format COMPLETE and
its per-expectation `unexpected_index_list` is mapped back to rows. A row that
any expectation flags is quarantined with the names of *all* the expectations it
failed, plus its original payload, so nothing is lost and every reject can be
explained and replayed (DESIGN invariant 3: accepted + quarantined + duplicates
= input, per run).

Values are coerced to the event schema before GX sees them (ids to str, numbers
to int64, ISO/datetime timestamps to epoch ms); a value that cannot be coerced is
not guessed at: it fails the `<column>_is_integer` expectation and is quarantined.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa

from data_contracts.gx_import import import_great_expectations
from data_contracts.schema import DEVICE_TYPES, EVENT_COLUMNS, EVENT_SCHEMA, EVENT_TYPES, ITEM_EVENT_TYPES, SCHEMA_VERSION

log = logging.getLogger("kairos.contracts")

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

QUARANTINE_EXTRA_COLUMNS: list[str] = ["reasons", "raw_payload", "run_id", "quarantined_at"]
QUARANTINE_COLUMNS: list[str] = EVENT_COLUMNS + QUARANTINE_EXTRA_COLUMNS
# The quarantine table is appended to across runs, so its schema must not depend on the data of one run.
QUARANTINE_SCHEMA: pa.Schema = pa.schema(
    list(EVENT_SCHEMA)
    + [("reasons", pa.string()), ("raw_payload", pa.string()), ("run_id", pa.string()), ("quarantined_at", pa.int64())]
)

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


# --------------------------------------------------------------------------- result
@dataclass
class ContractResult:
    accepted: pd.DataFrame        # EVENT_COLUMNS, valid and deduplicated, original order
    quarantined: pd.DataFrame     # QUARANTINE_COLUMNS
    duplicates: int               # valid rows dropped because their event_id was already seen
    n_in: int
    expectation_failures: dict[str, int]  # rule name -> failing rows (every rule, zeros included)
    success: bool                 # the GX suite's verdict on the whole input
    run_id: str = ""
    now_ms: int = 0
    rules: list[Rule] = field(default_factory=list, repr=False)  # the rules this run was judged by
    validation: Any = field(default=None, repr=False)  # the GX ExpectationSuiteValidationResult (COMPLETE)
    duplicate_rows: pd.DataFrame | None = field(default=None, repr=False)  # EVENT_COLUMNS of the `duplicates` rows
    # input positions of the accepted, quarantined and duplicate rows (same order as those frames)
    positions: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def empty_share(self) -> "ContractResult":
        """The share of this result for a group with no rows (a day nothing arrived on)."""
        none = np.array([], dtype=np.int64)
        return ContractResult(accepted=self.accepted.iloc[:0], quarantined=self.quarantined.iloc[:0], duplicates=0,
                              n_in=0, expectation_failures={k: 0 for k in self.expectation_failures}, success=True,
                              run_id=self.run_id, now_ms=self.now_ms, rules=self.rules, validation=self.validation,
                              duplicate_rows=self.accepted.iloc[:0],
                              positions={"accepted": none, "quarantined": none, "duplicates": none})

    def split(self, groups: np.ndarray) -> dict[Any, "ContractResult"]:
        """One result per group label of the input rows (e.g. per ingest day), from a single GX run.

        Validating a many-day backfill once and splitting it costs one GX pass instead of one per day;
        every per-group count is exact (failure counts come from each quarantined row's reasons).
        """
        groups = np.asarray(groups, dtype=object)
        if len(groups) != self.n_in or not self.positions:
            raise ValueError("split needs one group label per input row of a result made by validate_events()")
        out: dict[Any, ContractResult] = {}
        acc_g, q_g, d_g = (groups[self.positions[k]] for k in ("accepted", "quarantined", "duplicates"))
        for g in pd.unique(groups):
            a, q, d = acc_g == g, q_g == g, d_g == g
            quarantined = self.quarantined[q].reset_index(drop=True)
            reasons = quarantined["reasons"].astype(str).str.split("; ")
            counts = reasons.explode().value_counts().to_dict() if len(quarantined) else {}
            failures = {name: int(counts.get(name, 0)) for name in self.expectation_failures}
            out[g] = ContractResult(
                accepted=self.accepted[a].reset_index(drop=True), quarantined=quarantined, duplicates=int(d.sum()),
                n_in=int((groups == g).sum()), expectation_failures=failures, success=not any(failures.values()),
                run_id=self.run_id, now_ms=self.now_ms, rules=self.rules, validation=self.validation,
                duplicate_rows=None if self.duplicate_rows is None else self.duplicate_rows[d].reset_index(drop=True),
                positions={"accepted": self.positions["accepted"][a], "quarantined": self.positions["quarantined"][q],
                           "duplicates": self.positions["duplicates"][d]},
            )
        return out

    def reconciles(self) -> bool:
        """Nothing lost: every input row is accepted, quarantined or a counted duplicate."""
        return self.n_in == len(self.accepted) + len(self.quarantined) + self.duplicates

    def summary(self) -> dict[str, Any]:
        """Flat counts for Dagster asset metadata."""
        failed = sorted(name for name, n in self.expectation_failures.items() if n)
        return {
            "n_in": self.n_in,
            "accepted": len(self.accepted),
            "quarantined": len(self.quarantined),
            "duplicates": self.duplicates,
            "suite_success": bool(self.success),
            "reconciles": self.reconciles(),
            "expectations_evaluated": len(self.expectation_failures),
            "expectations_failed": len(failed),
            "failed_expectations": ", ".join(failed),
            "now_ms": self.now_ms,
        }


# --------------------------------------------------------------------------- coercion
def _check_columns(events: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(
            f"events are missing required column(s) {missing}; the event contract needs {list(REQUIRED_COLUMNS)} "
            f"(optional: {list(OPTIONAL_COLUMNS)}). Fix the source to emit them (see data_contracts/schema.py "
            f"EVENT_SCHEMA; schema_version should be {SCHEMA_VERSION})."
        )


def _to_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # ids that went through a float column: 42.0 -> "42"
    return str(value)


def _as_object(raw: pd.Series) -> pd.Series:
    """RangeIndex'd values; string/categorical extension dtypes become plain objects (None for missing)."""
    values = raw.reset_index(drop=True)
    if values.dtype != object and (pd.api.types.is_string_dtype(values.dtype)
                                   or isinstance(values.dtype, pd.CategoricalDtype)):
        values = values.astype(object).where(values.notna(), None)
    return values


def _coerce_strings(raw: pd.Series, blank_is_null: bool) -> pd.Series:
    """Object column of str or None; anything non-null is stringified (ids may arrive as ints)."""
    values = _as_object(raw)
    notna = values.notna()
    if values.dtype == object and pd.api.types.infer_dtype(values, skipna=True) in ("string", "empty"):
        out = values if notna.all() else values.where(notna, None)
    else:
        out = pd.Series(np.full(len(values), None, dtype=object), index=values.index)
        if notna.any():
            out[notna] = values[notna].map(_to_str).astype(object)
    if blank_is_null:
        out = out.where(out != "", None)
    return out


def _datetimes_to_ms(values: pd.Series) -> pd.Series:
    """Datetime-like values to epoch ms (float, NaN where unparseable); naive values are read as UTC."""
    parsed = pd.to_datetime(values, utc=True, errors="coerce", format="ISO8601") if values.dtype == object \
        else (values.dt.tz_localize("UTC") if values.dt.tz is None else values.dt.tz_convert("UTC"))
    ms = (parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "ms")
    return ms.astype("float64")


def _coerce_ints(raw: pd.Series, allow_datetimes: bool) -> tuple[pd.Series, pd.Series]:
    """(Int64 column, unreadable mask): whole numbers pass, anything else becomes null and is flagged."""
    values = _as_object(raw)
    if pd.api.types.is_integer_dtype(values.dtype) and not pd.api.types.is_unsigned_integer_dtype(values.dtype):
        return values.astype("Int64"), pd.Series(False, index=values.index)
    present = values.notna()
    if values.dtype == object:
        present &= values.ne("")  # CSV convention: an empty cell is a missing value
    if pd.api.types.is_bool_dtype(values.dtype):
        nums = pd.Series(np.nan, index=values.index)
    elif pd.api.types.is_datetime64_any_dtype(values.dtype):
        nums = _datetimes_to_ms(values) if allow_datetimes else pd.Series(np.nan, index=values.index)
    else:
        nums = pd.to_numeric(values.where(present), errors="coerce")
        if pd.api.types.is_bool_dtype(nums.dtype) or not pd.api.types.is_numeric_dtype(nums.dtype):
            nums = pd.Series(np.nan, index=values.index)
        if values.dtype == object:
            # to_numeric accepts True/False; a boolean is not a count or a time
            is_bool = values.map(type).isin((bool, np.bool_))
            nums = nums.where(~is_bool)
        if allow_datetimes and values.dtype == object:
            retry = present & nums.isna()
            if retry.any():
                nums = nums.astype("float64")
                nums[retry] = _datetimes_to_ms(values[retry])
    if pd.api.types.is_integer_dtype(nums.dtype) and not pd.api.types.is_unsigned_integer_dtype(nums.dtype):
        out = nums.astype("Int64")
    else:
        f = nums.astype("float64")
        whole = np.isfinite(f) & (np.floor(f) == f) & (f.abs() < 2.0**63)
        out = pd.Series(pd.array(np.where(whole, f, 0).astype("int64"), dtype="Int64"), index=values.index)
        out[~whole] = pd.NA
    unreadable = present & out.isna()
    return out, unreadable


def _typed_frame(events: pd.DataFrame) -> pd.DataFrame:
    """EVENT_COLUMNS in schema types plus `<int col>__unreadable` flag columns, on a RangeIndex."""
    n = len(events)
    cols: dict[str, pd.Series] = {}
    for col in EVENT_COLUMNS:
        raw = events[col] if col in events.columns else pd.Series(np.full(n, None, dtype=object))
        if isinstance(raw, pd.DataFrame):  # duplicated column label: the first one wins
            raw = raw.iloc[:, 0]
        if col in INT_COLUMNS:
            typed, unreadable = _coerce_ints(raw, allow_datetimes=(col == "timestamp"))
            cols[col] = typed
            # 1.0 where the value could not be read as an int64 (the value itself is kept in raw_payload);
            # a float flag rather than the raw object keeps GX's many frame copies cheap
            cols[f"{col}{_UNREADABLE}"] = pd.Series(np.where(unreadable.to_numpy(), 1.0, np.nan), index=typed.index)
        else:
            cols[col] = _coerce_strings(raw, blank_is_null=col in BLANK_IS_NULL)
    return pd.DataFrame(cols, index=pd.RangeIndex(n), copy=False)  # copy=False: no block consolidation


# --------------------------------------------------------------------------- GX run
def _gx_frame(typed: pd.DataFrame, rules: list[Rule]) -> pd.DataFrame:
    """What GX sees: only the columns the rules read, numbers as float64 (NaN = null).

    float64 keeps GX on its vectorized comparison path (nullable Int64 makes it call
    Python per value) and is exact for epoch ms; narrower frames are cheaper to filter.
    """
    conditions = " ".join(str(rule.kwargs.get("row_condition") or "") for rule in rules)
    targets = {rule.kwargs["column"] for rule in rules}
    used = [c for c in typed.columns if c in targets or c in conditions]  # substring match may over-include: harmless
    cols = {}
    for col in used:
        s = typed[col]
        cols[col] = s.to_numpy(dtype="float64", na_value=np.nan) if isinstance(s.dtype, pd.Int64Dtype) else s
    return pd.DataFrame(cols, index=typed.index)  # consolidated blocks: GX filters it many times


def _ephemeral_context(docs_dir: str | None = None) -> Any:
    """An in-memory GX context (no files, no analytics, no progress bars); optionally with a docs site."""
    gx = import_great_expectations()
    from great_expectations.data_context.types.base import (DataContextConfig, InMemoryStoreBackendDefaults,
                                                             ProgressBarsConfig)

    sites = {} if docs_dir is None else {"kairos": {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }}
    return gx.get_context(mode="ephemeral", project_config=DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False, progress_bars=ProgressBarsConfig(globally=False), data_docs_sites=sites))


def _run_suite(frame: pd.DataFrame, rules: list[Rule], run_id: str) -> Any:
    """Validate `frame` with the contract suite in an ephemeral GX context (COMPLETE result)."""
    gx = import_great_expectations()
    from great_expectations.core.run_identifier import RunIdentifier

    context = _ephemeral_context()
    batch_definition = (context.data_sources.add_pandas("kairos")
                        .add_dataframe_asset("events")
                        .add_batch_definition_whole_dataframe("events_batch"))
    suite = context.suites.add(build_suite(rules))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="kairos_events_contract", data=batch_definition, suite=suite))
    return definition.run(batch_parameters={"dataframe": frame},
                          result_format={"result_format": "COMPLETE"},
                          run_id=RunIdentifier(run_name=str(run_id)))


def _failing_rows(validation: Any, rules: list[Rule], n: int) -> dict[str, np.ndarray]:
    """Rule name -> boolean row mask, from GX's unexpected_index_list (fail closed if GX errored)."""
    masks = {rule.name: np.zeros(n, dtype=bool) for rule in rules}
    for res in validation.results:
        name = (res.expectation_config.meta or {}).get("kairos_rule")
        if name not in masks:
            continue
        if res.exception_info and res.exception_info.get("raised_exception"):
            # GX could not evaluate the rule: nothing it should have checked may pass unchecked
            log.error("expectation %s raised inside GX (%s): quarantining every row for it",
                      name, res.exception_info.get("exception_message"))
            masks[name][:] = True
            continue
        idx = (res.result or {}).get("unexpected_index_list") or []
        if idx and isinstance(idx[0], dict):  # only when unexpected_index_column_names is configured
            idx = [next(iter(d.values())) for d in idx]
        if idx:
            masks[name][np.asarray(idx, dtype=np.int64)] = True
        elif not res.success:
            log.error("expectation %s failed without row indices: quarantining every row for it", name)
            masks[name][:] = True
    return masks


# --------------------------------------------------------------------------- quarantine frame
def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date, pd.Timestamp)):
        return value.isoformat()
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _clean_json(value: Any) -> Any:
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _row_json(row: Mapping[Any, Any]) -> str:
    clean = {str(k): _clean_json(v) for k, v in row.items()}
    try:
        return json.dumps(clean, default=_json_default, allow_nan=False)
    except (TypeError, ValueError, OverflowError, RecursionError):  # e.g. NaN nested in a list
        return json.dumps({k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
                           for k, v in clean.items()}, allow_nan=True)


def _payloads(events: pd.DataFrame, positions: np.ndarray) -> list[str]:
    """The original rows (all their columns, nulls kept) as JSON: what was received, before coercion."""
    rows = events.iloc[positions]
    if not rows.columns.is_unique:  # keep every column: a repeated label gets a #n suffix
        seen: dict[str, int] = {}
        names = []
        for col in map(str, rows.columns):
            names.append(col if col not in seen else f"{col}#{seen[col]}")
            seen[col] = seen.get(col, 0) + 1
        rows = rows.set_axis(names, axis=1)
    try:  # pandas' C encoder: ~20x faster than json.dumps per row, which matters when a whole batch fails
        text = rows.to_json(orient="records", lines=True, date_format="iso", date_unit="ms",
                            double_precision=15, force_ascii=False, default_handler=str)
        lines = text[:-1].split("\n") if text.endswith("\n") else text.split("\n")  # JSON escapes raw newlines
        if len(lines) == len(rows):
            return lines
    except Exception as exc:  # noqa: BLE001 - any odd value: fall back to the row-by-row encoder
        log.debug("to_json could not encode quarantined rows (%s); encoding row by row", exc)
    return [_row_json(row) for row in rows.to_dict("records")]


def _quarantine_frame(events: pd.DataFrame, typed: pd.DataFrame, masks: dict[str, np.ndarray],
                      bad: np.ndarray, run_id: str, quarantined_at: int) -> pd.DataFrame:
    positions = np.flatnonzero(bad)
    out = typed.iloc[positions][EVENT_COLUMNS].reset_index(drop=True)
    reasons = np.full(len(positions), "", dtype=object)
    for name, mask in masks.items():  # rule declaration order
        hit = mask[positions]
        if hit.any():
            reasons[hit] = reasons[hit] + np.where(reasons[hit] == "", "", "; ") + name
    out["reasons"] = reasons
    out["raw_payload"] = _payloads(events, positions)
    out["run_id"] = str(run_id)
    out["quarantined_at"] = np.full(len(positions), quarantined_at, dtype=np.int64)
    return _quarantine_dtypes(out)


def _quarantine_dtypes(frame: pd.DataFrame) -> pd.DataFrame:
    """Strings as pandas 'string' and ints as Int64, so Arrow/Delta types never depend on the data."""
    out = {}
    for f in QUARANTINE_SCHEMA:
        col = frame[f.name]
        if f.name == "quarantined_at":
            out[f.name] = col.astype("int64")
        elif pa.types.is_integer(f.type):
            out[f.name] = col.astype("Int64")
        else:
            out[f.name] = col.astype("string")
    return pd.DataFrame(out, index=frame.index)


def empty_quarantine() -> pd.DataFrame:
    """A zero-row quarantine frame with the right dtypes."""
    return _quarantine_dtypes(pd.DataFrame({c: pd.Series([], dtype=object) for c in QUARANTINE_COLUMNS}))


def _accepted_frame(typed: pd.DataFrame, keep: np.ndarray) -> pd.DataFrame:
    out = typed.loc[keep, EVENT_COLUMNS].reset_index(drop=True)
    for col in ("timestamp", "schema_version"):  # non-null once accepted
        out[col] = out[col].astype("int64")
    return out


# --------------------------------------------------------------------------- entry point
def validate_events(events: pd.DataFrame, run_id: str, now_ms: int | None = None,
                    max_future_skew_ms: int = DEFAULT_MAX_FUTURE_SKEW_MS, dedup: bool = True) -> ContractResult:
    """Split raw events into accepted (valid, deduplicated), quarantined (with reasons) and duplicates.

    GX decides validity; this function only coerces types beforehand and maps GX's
    unexpected row indices back to rows afterwards. Raises ValueError only when a
    required column is absent (nothing can be judged then); bad values never raise.
    `now_ms` (default: wall clock) bounds future timestamps; set it when backfilling.
    `dedup=False` keeps repeated event ids among the accepted rows: for a caller that judges one slice of
    a larger input and drops repeats across all of it (the Spark engine, ingestion/refine_spark.py).
    """
    if not isinstance(events, pd.DataFrame):
        raise TypeError(f"validate_events expects a pandas DataFrame, got {type(events).__name__}")
    _check_columns(events)
    wall_ms = int(time.time() * 1000)
    now_ms = wall_ms if now_ms is None else int(now_ms)
    n = len(events)
    rules = event_rules(now_ms, max_future_skew_ms)
    typed = _typed_frame(events)
    validation = _run_suite(_gx_frame(typed, rules), rules, run_id)
    masks = _failing_rows(validation, rules, n)
    bad = np.zeros(n, dtype=bool)
    for mask in masks.values():
        bad |= mask
    valid = ~bad
    # "already seen" counts valid rows only: a quarantined twin must not shadow a good event
    dup = np.zeros(n, dtype=bool)
    if dedup:
        dup[valid] = typed.loc[valid, "event_id"].duplicated(keep="first").to_numpy()
    keep = valid & ~dup
    quarantined = _quarantine_frame(events, typed, masks, bad, run_id, wall_ms) if bad.any() else empty_quarantine()
    result = ContractResult(
        accepted=_accepted_frame(typed, keep),
        quarantined=quarantined,
        duplicates=int(dup.sum()),
        n_in=n,
        expectation_failures={name: int(mask.sum()) for name, mask in masks.items()},
        success=bool(validation.success),
        run_id=str(run_id),
        now_ms=now_ms,
        rules=rules,
        validation=validation,
        duplicate_rows=_accepted_frame(typed, dup),
        positions={"accepted": np.flatnonzero(keep), "quarantined": np.flatnonzero(bad), "duplicates": np.flatnonzero(dup)},
    )
    log.info("contract run %s: %s in, %s accepted, %s quarantined, %s duplicates (suite success=%s)",
             run_id, n, len(result.accepted), len(quarantined), result.duplicates, result.success)
    return result


def build_data_docs(result: ContractResult, directory: str | Path) -> Path:
    """Render GX data docs (suite + this run's validation) as static HTML; returns the index.html path.

    For humans triaging a quarantine spike: the page lists every expectation, its
    failure count and sample unexpected values.
    """
    import_great_expectations()
    from great_expectations.data_context.types.resource_identifiers import (ExpectationSuiteIdentifier,
                                                                            ValidationResultIdentifier)

    if result.validation is None or not result.rules:
        raise ValueError("this ContractResult carries no GX validation; produce it with validate_events()")
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    context = _ephemeral_context(str(directory))
    suite = context.suites.add(build_suite(result.rules))
    key = ValidationResultIdentifier(expectation_suite_identifier=ExpectationSuiteIdentifier(name=suite.name),
                                     run_id=result.validation.meta["run_id"],
                                     batch_identifier=result.validation.batch_id)
    context.validation_results_store.set(key, result.validation)
    context.build_data_docs(site_names=["kairos"])
    return directory / "index.html"


__all__ = ["ContractResult", "QUARANTINE_COLUMNS", "QUARANTINE_SCHEMA", "REQUIRED_COLUMNS", "Rule", "build_data_docs",
           "build_suite", "empty_quarantine", "event_rules", "validate_events"]
