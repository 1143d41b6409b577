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
from data_contracts.schema import EVENT_COLUMNS, EVENT_SCHEMA
from data_contracts.event_rules import DEFAULT_MAX_FUTURE_SKEW_MS, Rule, build_suite, event_rules
from data_contracts.event_coercion import _check_columns, _typed_frame

log = logging.getLogger("kairos.contracts")


QUARANTINE_EXTRA_COLUMNS: list[str] = ["reasons", "raw_payload", "run_id", "quarantined_at"]
QUARANTINE_COLUMNS: list[str] = EVENT_COLUMNS + QUARANTINE_EXTRA_COLUMNS
# The quarantine table is appended to across runs, so its schema must not depend on the data of one run.
QUARANTINE_SCHEMA: pa.Schema = pa.schema(
    list(EVENT_SCHEMA)
    + [("reasons", pa.string()), ("raw_payload", pa.string()), ("run_id", pa.string()), ("quarantined_at", pa.int64())]
)


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


__all__ = ["ContractResult", "QUARANTINE_COLUMNS", "QUARANTINE_SCHEMA", "build_data_docs", "empty_quarantine",
           "validate_events"]
