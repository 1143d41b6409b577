"""Ingestion assets: source → bronze events (daily) → contract, dedup, bots → silver + quarantine → labels.

The event assets are partitioned by ingest day (the UTC day a batch arrived), so one
day can be backfilled from the Dagster UI; a backfill of many days runs as a single
run (BackfillPolicy.single_run) that walks the days in order. Every write replaces
exactly its day's rows and is skipped when the content is unchanged, so replaying
a day changes nothing downstream.
"""

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator
import time

import numpy as np
import pandas as pd
from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, AssetSpec,
                     BackfillPolicy, Config, DailyPartitionsDefinition, Failure, MaterializeResult, MetadataValue, asset,
                     multi_asset)

from compliance.exclusion import drop_forgotten
from compliance.versions import delta_data_version, source_version
from data_contracts.schema import BRONZE_SCHEMA, DAY_MS, HOUR_MS, ITEM_SCHEMA, USER_SCHEMA
from ingestion.labels import LabelConfig
from ingestion.refine import RefineConfig
from ingestion.sources import CATALOG_NEGATIVES, SIMULATOR_DEFAULTS
from assets.config import Knob, dataclass_config, to_dataclass
from assets.resources import ArtifactsResource, LakeResource
from ground.phases import Phases
from ground.settings import Settings

BRONZE = "bronze_events"
SILVER = "silver_events"
QUARANTINE = "quarantine_events"
ITEMS = "catalog_items"
USERS = "catalog_users"
LABELS = "labels"
EVENT_ASSETS = (BRONZE, SILVER, QUARANTINE)
# code versions (compliance/versions.py): this module + the library code each asset runs
SOURCE_CODE = source_version(__file__, "ingestion/simulator.py", "ingestion/movielens.py", "ingestion/generic.py",
                             "ingestion/catalog.py", "ingestion/sources.py", "data_contracts/schema.py",
                             "compliance/exclusion.py")
REFINE_CODE = source_version(__file__, "ingestion/refine.py", "ingestion/refine_spark.py", "ingestion/bots.py", "ingestion/dedup.py",
                             "data_contracts/events.py", "data_contracts/event_rules.py",
                             "data_contracts/event_rules_spark.py")
LABELS_CODE = source_version(__file__, "ingestion/labels.py", "ingestion/labels_spark.py", "compliance/exclusion.py")



def daily_partitions_def(start: str, end: str | None) -> DailyPartitionsDefinition:
    """The ingest days: `start` .. `end` (inclusive) for a historical world, else `start` .. today (end_offset=1:
    today's partition exists while its batches arrive). A bad or reversed day fails here, naming the variable."""
    import datetime as dt

    days: dict[str, dt.date | None] = {}
    for var, day in (("KAIROS_PARTITION_START", start), ("KAIROS_PARTITION_END", end)):
        try:
            days[var] = dt.date.fromisoformat(day) if day is not None else None
        except ValueError:
            raise ValueError(f"{var} (or KAIROS_HOME/{var.lower()[7:]}) must be a day YYYY-MM-DD"
                             f"{' or live' if var.endswith('END') else ''}, got {day!r}") from None
    first, last = days["KAIROS_PARTITION_START"], days["KAIROS_PARTITION_END"]
    if last is None:
        return DailyPartitionsDefinition(start_date=start, end_offset=1)
    if first is not None and last < first:
        raise ValueError(f"KAIROS_PARTITION_END {end} is before KAIROS_PARTITION_START {start}")
    # end_date is exclusive; end_offset=1 still caps the range at today when the data's last day is in the future
    return DailyPartitionsDefinition(start_date=start, end_date=(last + dt.timedelta(days=1)).isoformat(), end_offset=1)


daily_partitions = daily_partitions_def(Settings.from_env().partition_start, Settings.from_env().partition_end)


class SourceConfig(Config):
    """Where events come from: the seeded simulator (default), MovieLens (100K, 1M, latest), or any log file.

    source="file": `path` is a CSV/TSV/Parquet log and `mapping_json` its column mapping (ingestion/generic.py,
    which also carries delimiter, encoding, composite time, anonymous users); `catalog_path` + `catalog_mapping_json`
    and `users_path` + `users_mapping_json` join an item catalog / user profiles (ingestion/catalog.py).
    source="movielens-*": `path` (or `movielens_dir`) is the data set's folder.
    """

    source: str = "simulator"
    n_users: int = SIMULATOR_DEFAULTS["n_users"]
    n_items: int = SIMULATOR_DEFAULTS["n_items"]
    n_categories: int = SIMULATOR_DEFAULTS["n_categories"]
    days: int = SIMULATOR_DEFAULTS["days"]
    seed: int = SIMULATOR_DEFAULTS["seed"]
    shift_day: int = SIMULATOR_DEFAULTS["shift_day"]
    movielens_dir: str = ""
    path: str = ""            # source="file": a CSV/Parquet interaction log; movielens-*: its folder
    mapping_json: str = ""    # source="file": column mapping, e.g. {"user": "uid", "item": "sku", "timestamp": "ts"}
    catalog_path: str = ""    # optional item catalog file (ids, categories, title, tags, publish time)
    catalog_mapping_json: str = ""
    users_path: str = ""      # optional user profile file
    users_mapping_json: str = ""
    arrival: str = "export"   # historical logs: "export" = one ingest batch on the last day; "event" = per day


def load_source(config: SourceConfig) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """events (with received_at), items, users from the configured source; cached per config in a process."""
    from ingestion.sources import load_source_frames

    return load_source_frames(config.model_dump())


def ingest_day(received_at: pd.Series) -> np.ndarray:
    """The ingest partition (UTC day of arrival) of each event."""
    from ingestion.refine import event_dates

    return event_dates(received_at.to_numpy(dtype="int64"))


def source_partitions(config: SourceConfig) -> list[str]:
    """The ingest days a source's events arrive on: what a full backfill must cover."""
    events, _, _ = load_source(config)
    return sorted(set(ingest_day(events["received_at"])))


def _partition_days(context: AssetExecutionContext) -> list[str]:
    return list(context.partition_keys)


# a backfill writes consecutive ingest days together until a batch holds this many events: years of history in
# a few Delta commits and refine passes, so cost follows events, not calendar days
BACKFILL_BATCH_EVENTS = 500_000


def backfill_batches(days: list[str], day_of_row: np.ndarray, max_events: int = BACKFILL_BATCH_EVENTS) -> list[list[str]]:
    """The run's (consecutive) days cut into runs of days holding about `max_events` events each."""
    counts = pd.Series(day_of_row).value_counts().to_dict() if len(day_of_row) else {}
    batches: list[list[str]] = []
    current: list[str] = []
    n = 0
    for day in days:
        current.append(day)
        n += int(counts.get(day, 0))
        if n >= max_events:
            batches.append(current)
            current, n = [], 0
    if current:
        batches.append(current)
    return batches


@multi_asset(
    specs=[
        AssetSpec(ITEMS, group_name="ingestion", code_version=SOURCE_CODE,
                  description="Item catalog: id, title, category, tags, publish time."),
        AssetSpec(USERS, group_name="ingestion", code_version=SOURCE_CODE,
                  description="User profiles: segment, device, region, signup time (forgotten users excluded)."),
    ],
)
def catalog(context: AssetExecutionContext, config: SourceConfig, lake: LakeResource):
    """The catalog as of now (not partitioned: a snapshot, versioned by Delta)."""
    _, items, users = load_source(config)
    store = lake.lake()
    users, forgotten = drop_forgotten(users, store)  # the right to be forgotten survives a re-ingest
    it = store.write(ITEMS, items, schema=ITEM_SCHEMA)
    us = store.write(USERS, users, schema=USER_SCHEMA)
    context.log.info(f"catalog: {it.rows} items, {us.rows} users")
    yield MaterializeResult(asset_key=ITEMS, metadata={"rows": it.rows, "delta_version": it.version},
                            data_version=delta_data_version(ITEMS, it.version))
    yield MaterializeResult(asset_key=USERS, metadata={"rows": us.rows, "delta_version": us.version,
                                                       "forgotten_users_excluded": forgotten},
                            data_version=delta_data_version(USERS, us.version))


@asset(group_name="ingestion", partitions_def=daily_partitions, backfill_policy=BackfillPolicy.single_run(),
       code_version=SOURCE_CODE,
       description="Raw events as received, one batch per ingest day (Delta, partitioned by ingest_date); "
                   "events of forgotten users are never stored again.")
def bronze_events(context: AssetExecutionContext, config: SourceConfig, lake: LakeResource) -> MaterializeResult:
    t0 = time.perf_counter()
    events, _, _ = load_source(config)
    days = _partition_days(context)
    store = lake.lake()
    events, forgotten = drop_forgotten(events, store)
    arrived = ingest_day(events["received_at"])
    in_run = np.isin(arrived, days)
    events, arrived = events[in_run], arrived[in_run]
    batches = backfill_batches(days, arrived)
    rows, written, skipped, version = 0, 0, 0, -1
    for i, batch_days in enumerate(batches):
        sel = np.isin(arrived, batch_days)
        batch = events[sel].assign(ingest_date=arrived[sel])
        out = store.write_day_batches(BRONZE, batch, batch_days, "ingest_date", schema=BRONZE_SCHEMA,
                                      partition_by=["ingest_date"],
                                      commit_properties={"run_id": context.run_id, "source": config.source})
        rows += out.rows
        skipped += out.skipped
        written += not out.skipped
        version = out.version
        context.log.info(f"bronze: batch {i + 1}/{len(batches)} ({batch_days[0]}..{batch_days[-1]}, "
                         f"{len(batch_days)} days): {out.rows} events{' unchanged' if out.skipped else ''}; "
                         f"{rows} so far")
    context.log.info(f"bronze: {rows} events over {len(days)} day(s) in {len(batches)} batch(es) in "
                     f"{time.perf_counter() - t0:.1f}s ({skipped} unchanged batches skipped)")
    return MaterializeResult(metadata={"rows": rows, "days": len(days), "batches": len(batches), "batches_written": written,
                                       "batches_unchanged": skipped, "delta_version": version, "source": config.source,
                                       "forgotten_user_events_excluded": forgotten},
                             data_version=delta_data_version(BRONZE, version) if version >= 0 else None)


# the bronze -> silver thresholds: RefineConfig's (and its BotConfig's) in launchpad units, plus the asset's own.
# dedup_lookback_days: earlier batches searched for duplicates of this one. engine: pandas = one process judges the
# run; spark = executors do (ingestion/refine_spark.py, same rules, memory bounded per partition); auto = spark when
# the run's bronze rows reach spark_min_events (opt-in until the Spark engine is measured faster, README "Measured")
if TYPE_CHECKING:
    RefineSettings = Any
else:
    RefineSettings = dataclass_config("RefineSettings", RefineConfig, (
        Knob("dedup_window_seconds", "dedup_window_ms", scale=1000),
        Knob("dedup_lookback_days", None, type=int, default=2),
        Knob("bot_filter", "bots.enabled"), Knob("bot_max_clicks", "bots.max_clicks"),
        Knob("bot_window_seconds", "bots.window_ms", scale=1000), Knob("bot_max_median_dwell_ms", "bots.max_median_dwell_ms"),
        Knob("max_future_skew_seconds", "max_future_skew_ms", scale=1000),
        Knob("max_quarantine_rate", None, type=float, default=0.05),
        Knob("engine", None, type=str, default="pandas"), Knob("spark_min_events", None, type=int, default=1_000_000),
    ), __name__, doc="Thresholds of the bronze → silver step (all in one place, visible in the launchpad).")


def pick_engine(engine: str, n_rows: Any, spark_min_events: int) -> str:
    """The `engine` setting of silver_events and labels: pandas, spark, or auto = spark once the run's rows
    (`n_rows()`, counted only for auto) reach spark_min_events."""
    if engine not in ("pandas", "spark", "auto"):
        raise Failure(description=f"engine must be pandas, spark or auto, got {engine!r}")
    return engine if engine != "auto" else ("spark" if n_rows() >= spark_min_events else "pandas")


def _prior_silver(store, day: str, batch: pd.DataFrame, lookback_days: int) -> pd.DataFrame | None:
    """Silver rows of earlier ingest days whose events happened near this batch's: where its duplicates hide."""
    from ingestion.refine import event_dates

    if not store.exists(SILVER) or batch.empty:
        return None
    ts = pd.to_numeric(batch["timestamp"], errors="coerce")
    ts = ts[ts > 0]
    if ts.empty:
        return None
    lo = event_dates(np.array([int(ts.min()) - lookback_days * DAY_MS]))[0]
    hi = event_dates(np.array([int(ts.max()) + DAY_MS]))[0]
    from data_contracts.schema import EVENT_COLUMNS

    prior = store.read(SILVER, columns=EVENT_COLUMNS + ["ingest_date"],
                       filters=[("event_date", ">=", lo), ("event_date", "<=", hi), ("ingest_date", "<", day)])
    return prior if len(prior) else None


@multi_asset(
    specs=[
        AssetSpec(SILVER, deps=[BRONZE], group_name="ingestion", partitions_def=daily_partitions, code_version=REFINE_CODE,
                  description="Events that passed the contract, deduplicated, bots removed (Delta, partitioned by ingest_date; "
                              "event_date kept as a column)."),
        AssetSpec(QUARANTINE, deps=[BRONZE], group_name="ingestion", partitions_def=daily_partitions, code_version=REFINE_CODE,
                  description="Every rejected event with reason(s), raw payload, run id and disposition "
                              "(contract, duplicate, bot)."),
    ],
    check_specs=[AssetCheckSpec("events_contract", asset=SILVER,
                                description="Great Expectations event contract: per-rule failure counts; warns when the "
                                            "quarantine rate passes max_quarantine_rate (bad rows are quarantined, not lost)."),
                 AssetCheckSpec("counts_reconcile", asset=SILVER, blocking=True,
                                description="in = accepted + quarantined + duplicates + bot_filtered per day, and bronze rows = "
                                            "silver + quarantine rows in Delta. Blocking: a run that lost events stops here.")],
    backfill_policy=BackfillPolicy.single_run(),
)
def silver_events(context: AssetExecutionContext, config: RefineSettings, lake: LakeResource,
                  artifacts: ArtifactsResource):
    """Judge the run's bronze days in batches (contract → dedup → bots) and write silver and quarantine."""
    from data_contracts.events import build_data_docs, validate_events
    from ingestion.refine import REJECT_SCHEMA, SILVER_SCHEMA, refine_batch

    store = lake.lake()
    pin = store.pin(BRONZE)
    days = _partition_days(context)
    rc = to_dataclass(config, RefineConfig)
    engine = pick_engine(config.engine, lambda: store.count_rows(BRONZE, "ingest_date", days), config.spark_min_events)
    if engine == "spark":
        yield from _silver_on_spark(context, config, store, pin, days, artifacts)
        return
    totals = {"in": 0, "accepted": 0, "quarantined": 0, "duplicates": 0, "bot_filtered": 0, "bot_sessions": 0}
    dup_reasons: dict[str, int] = {}
    per_day, bots = [], []
    silver_v = quarantine_v = -1
    # one GX pass over the whole range (first arrival first), then each batch of consecutive days in order (a few
    # batches for years of history): dedup looks back at the days already written, and within a batch the first
    # arrival wins, so a range run and day-by-day runs agree (bots are judged per batch: a session crossing
    # midnight is seen whole)
    bronze = store.read(BRONZE, version=pin.version, filters=[("ingest_date", "in", days)])
    bronze = bronze.sort_values(["ingest_date", "received_at"], kind="mergesort").reset_index(drop=True)
    batch_of = bronze.pop("ingest_date").to_numpy(dtype=object)
    # an event that arrived by the end of the run's last day cannot have happened after it (plus the allowed skew)
    end_of_range = int(pd.Timestamp(days[-1], tz="UTC").value // 1_000_000) + DAY_MS
    now_ms = min(int(time.time() * 1000), end_of_range)
    contract = validate_events(bronze, run_id=context.run_id, now_ms=now_ms, max_future_skew_ms=rc.max_future_skew_ms)
    batches = backfill_batches(days, batch_of)
    batch_no = np.empty(len(batch_of), dtype=object)
    for i, batch_days in enumerate(batches):
        batch_no[np.isin(batch_of, batch_days)] = i
    by_batch = contract.split(batch_no)
    context.log.info(f"contract: {contract.n_in} events over {len(days)} day(s) in {len(batches)} batch(es), "
                     f"{len(contract.quarantined)} quarantined")
    for i, batch_days in enumerate(batches):
        sel = batch_no == i
        raw = bronze[sel].reset_index(drop=True)
        result = refine_batch(raw, ingest_date=batch_days[0], run_id=context.run_id,
                              prior=_prior_silver(store, batch_days[0], raw, config.dedup_lookback_days),
                              now_ms=now_ms, config=rc, contract=by_batch.get(i) or contract.empty_share(),
                              ingest_dates=batch_of)
        # partitioned like bronze, by ingest day: one file per batch, so twenty years of history are a few files
        # (by event day it was one file per calendar day, and every read paid for each)
        s = store.write_day_batches(SILVER, result.accepted, batch_days, "ingest_date", schema=SILVER_SCHEMA,
                                    partition_by=["ingest_date"],
                                    commit_properties={"run_id": context.run_id, "bronze_version": pin.version})
        q = store.write_day_batches(QUARANTINE, result.rejected, batch_days, "ingest_date", schema=REJECT_SCHEMA,
                                    partition_by=["ingest_date"],
                                    content_columns=[c for c in REJECT_SCHEMA.names if c not in ("run_id", "quarantined_at")],
                                    commit_properties={"run_id": context.run_id})
        silver_v, quarantine_v = s.version, q.version
        for k, v in result.counts().items():
            totals[k] += v
        for k, v in result.duplicate_reasons.items():
            dup_reasons[k] = dup_reasons.get(k, 0) + v
        if len(result.bots):
            bots.append(result.bots.assign(ingest_date=f"{batch_days[0]}..{batch_days[-1]}"))
        per_day.append({"ingest_dates": f"{batch_days[0]}..{batch_days[-1]}", "days": len(batch_days),
                        **result.counts(), "reconciles": result.reconciles(), "silver_unchanged": s.skipped})
        context.log.info(f"silver: batch {i + 1}/{len(batches)} ({batch_days[0]}..{batch_days[-1]}): "
                         f"{totals['accepted']} accepted so far")
    failures = contract.expectation_failures
    docs = build_data_docs(contract, artifacts.path("data_docs", context.run_id)) if contract.n_in else None
    all_bots = pd.concat(bots, ignore_index=True) if bots else pd.DataFrame()
    yield from _silver_results(store, config, artifacts, context.run_id, engine="pandas", days=days,
                               bronze_version=pin.version, totals=totals, silver_version=silver_v,
                               quarantine_version=quarantine_v, failures=failures, duplicate_reasons=dup_reasons,
                               bots=all_bots, per_batch=per_day, docs=docs)


def _silver_on_spark(context: AssetExecutionContext, config: RefineSettings, store, pin, days: list[str],
                     artifacts: ArtifactsResource):
    """The spark engine of silver_events (ingestion/refine_spark.py): same rules, same outputs and checks."""
    from assets.resources import SparkResource
    from data_contracts.event_rules import event_rules
    from data_contracts.events import build_data_docs, validate_events
    from ingestion.refine_spark import DOCS_SAMPLE_ROWS, refine_on_spark

    rc = to_dataclass(config, RefineConfig)
    end_of_range = int(pd.Timestamp(days[-1], tz="UTC").value // 1_000_000) + DAY_MS
    now_ms = min(int(time.time() * 1000), end_of_range)
    phases = Phases("silver_events (spark)", logging.getLogger("kairos.spark"))

    def data_docs() -> Any:  # GX, the validator of record, on a sample of the first day: the report's data docs
        sample = store.read(BRONZE, version=pin.version, filters=[("ingest_date", "in", days[:1])])
        sample = sample.head(DOCS_SAMPLE_ROWS).drop(columns=["ingest_date"])
        if not len(sample):
            return None
        return build_data_docs(validate_events(sample, run_id=context.run_id, now_ms=now_ms,
                                               max_future_skew_ms=rc.max_future_skew_ms),
                               artifacts.path("data_docs", context.run_id))

    # the data docs' GX run (driver Python) overlaps the JVM's start and the Spark jobs (the JVM's cores)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="data-docs") as pool:
        docs_run = pool.submit(data_docs)
        spark = SparkResource().session()
        phases.mark("Spark session")
        day_counts = {d: store.count_rows(BRONZE, "ingest_date", [d]) for d in days}
        batches = backfill_batches(days, np.repeat(np.array(days, dtype=object), [day_counts[d] for d in days]))
        phases.mark("bronze day counts")
        out = refine_on_spark(spark, store, BRONZE, SILVER, QUARANTINE, pin.version, days, batches, context.run_id,
                              now_ms, rc, config.dedup_lookback_days)
        phases.mark("refine_on_spark")
        docs = docs_run.result() if out.totals["in"] else None
        phases.mark("data docs (wait)")
    totals = out.totals
    rules = event_rules(now_ms, rc.max_future_skew_ms)
    failures = {r.name: int(out.expectation_failures.get(r.name, 0)) for r in rules}
    context.log.info(f"silver (spark): {totals}; {phases.summary()}")
    yield from _silver_results(store, config, artifacts, context.run_id, engine="spark", days=days,
                               bronze_version=pin.version, totals=totals, silver_version=out.silver_version,
                               quarantine_version=out.quarantine_version, failures=failures,
                               duplicate_reasons=out.duplicate_reasons, bots=out.bots, per_batch=out.per_batch, docs=docs)


def _silver_results(store, config: RefineSettings, artifacts: ArtifactsResource, run_id: str, *, engine: str,
                    days: list[str], bronze_version: int, totals: dict[str, int], silver_version: int,
                    quarantine_version: int, failures: dict[str, int], duplicate_reasons: dict[str, int],
                    bots: pd.DataFrame, per_batch: list[dict], docs: Any) -> Iterator[Any]:
    """What either engine's silver run reports: silver's and quarantine's materializations, the contract check
    and the blocking reconcile check (one definition, so both engines publish the same metadata)."""
    from ingestion.refine import bot_report

    quarantine_rate = totals["quarantined"] / max(totals["in"], 1)
    day_table = pd.DataFrame(per_batch)
    meta: dict[str, Any] = {
        **{("n_in" if k == "in" else k): v for k, v in totals.items()}, "days": len(days), "engine": engine,
        "bronze_version": bronze_version, "delta_version": silver_version, "quarantine_rate": round(quarantine_rate, 5),
        "expectation_failures": MetadataValue.json(failures), "duplicate_reasons": MetadataValue.json(duplicate_reasons),
        "bot_sessions_filtered": MetadataValue.json(json.loads(bot_report(bots))),
        "per_day": MetadataValue.md(day_table.to_markdown(index=False) if len(day_table) else "no days")}
    if docs is not None:
        meta["data_docs"] = MetadataValue.path(str(docs))
        meta["data_docs_url"] = artifacts.publish_report(Path(docs).parent, run_id, "data_docs")
    yield MaterializeResult(asset_key=SILVER, metadata=meta,
                            data_version=delta_data_version(SILVER, silver_version) if silver_version >= 0 else None)
    yield MaterializeResult(asset_key=QUARANTINE, metadata={
        "rows": totals["quarantined"] + totals["duplicates"] + totals["bot_filtered"], "delta_version": quarantine_version,
        "contract": totals["quarantined"], "duplicate": totals["duplicates"], "bot": totals["bot_filtered"]},
        data_version=delta_data_version(QUARANTINE, quarantine_version) if quarantine_version >= 0 else None)
    yield AssetCheckResult(
        check_name="events_contract", passed=quarantine_rate <= config.max_quarantine_rate, severity=AssetCheckSeverity.WARN,
        metadata={"quarantined": totals["quarantined"], "quarantine_rate": round(quarantine_rate, 5),
                  "max_quarantine_rate": config.max_quarantine_rate,
                  "failures_by_expectation": MetadataValue.json(failures)},
        description="At most max_quarantine_rate of events may fail the contract; per-expectation failure counts attached.",
    )
    yield _reconcile_check(store, days, totals, per_batch)


def _reconcile_check(store, days: list[str], totals: dict[str, int], per_day: list[dict]) -> AssetCheckResult:
    """Counts must add up in memory AND in the lake: bronze rows of these days = silver + quarantine rows."""
    in_lake = {table: store.count_rows(table, "ingest_date", days) if store.exists(table) else 0
               for table in (BRONZE, SILVER, QUARANTINE)}
    parts = totals["accepted"] + totals["quarantined"] + totals["duplicates"] + totals["bot_filtered"]
    passed = (totals["in"] == parts and all(d["reconciles"] for d in per_day)
              and in_lake[BRONZE] == in_lake[SILVER] + in_lake[QUARANTINE] == totals["in"])
    return AssetCheckResult(
        check_name="counts_reconcile", passed=passed,
        metadata={"in": totals["in"], "accepted": totals["accepted"], "quarantined": totals["quarantined"],
                  "duplicates": totals["duplicates"], "bot_filtered": totals["bot_filtered"],
                  "bronze_rows": in_lake[BRONZE], "silver_rows": in_lake[SILVER], "quarantine_rows": in_lake[QUARANTINE]},
        description="in = accepted + quarantined + duplicates + bot-filtered, per day and in the Delta tables.",
    )


# LabelConfig's rule, the window in hours. Two defaults are the asset's on purpose: LabelConfig's 0.0 (no catalog
# negatives, one row per impression) is what monitoring's served attribution, the world probe and the test fixture
# build on, while a training set needs catalog negatives: without them a ranker trained on impressions learns to
# re-order what was shown, not to rank the whole catalog it is asked to rank when serving. easy_negative_ratio:
# catalog negatives per positive, the logged-outcome rule (ingestion/sources.py; `kairos demo` sets it and
# click_is_positive per log kind); negative_popularity_alpha: draw ~ (engagements + 1) ** alpha, 0 = uniform
if TYPE_CHECKING:
    LabelSettings = Any
else:
    LabelSettings = dataclass_config("LabelSettings", LabelConfig, (
        Knob("attribution_window_hours", "attribution_window_ms", scale=HOUR_MS, type=float), "positive_threshold",
        Knob("easy_negative_ratio", default=CATALOG_NEGATIVES), Knob("negative_popularity_alpha", default=0.5),
        "click_is_positive", "seed",
        Knob("engine", None, type=str, default="pandas"), Knob("spark_min_events", None, type=int, default=1_000_000),
    ), __name__, doc="The label rule; `kairos demo` sets click_is_positive / easy_negative_ratio per log kind "
                     "(ingestion/sources.py).")


@asset(deps=[SILVER, ITEMS], group_name="ingestion", code_version=LABELS_CODE,
       description="One row per impression whose attribution window closed: weighted engagement label and binary label "
                   "(forgotten users excluded).")
def labels(context: AssetExecutionContext, config: LabelSettings, lake: LakeResource) -> MaterializeResult:
    from data_contracts.schema import EVENT_COLUMNS
    from ingestion.labels import build_labels, label_summary, untrainable_reason

    store = lake.lake()
    pin = store.pin(SILVER)
    if pick_engine(config.engine, lambda: pin.rows, config.spark_min_events) == "spark":
        return _labels_on_spark(config, store, pin)
    events = store.read(SILVER, version=pin.version, columns=EVENT_COLUMNS)
    events, forgotten = drop_forgotten(events, store)  # training honours the exclusion list
    catalog = store.read(ITEMS, columns=["item_id"])["item_id"].tolist() if store.exists(ITEMS) else None
    as_of = int(events["timestamp"].max()) + 1
    lab = build_labels(events, as_of_ms=as_of, catalog_item_ids=catalog,
                       config=to_dataclass(config, LabelConfig))
    if lab.empty or int(lab["label_binary"].sum()) == 0:
        raise Failure(description=untrainable_reason(events, lab, config.click_is_positive))
    out = store.write(LABELS, lab)
    return _labels_result(config, label_summary(lab), int(lab["label_binary"].sum()), pin.version, out.version,
                          as_of, forgotten, "pandas")


def _labels_on_spark(config: LabelSettings, store, pin) -> MaterializeResult:
    """The spark engine of labels (ingestion/labels_spark.py): build_labels per bucket of users on the executors."""
    from pyspark.sql import functions as F

    from assets.resources import SparkResource
    from compliance.exclusion import forgotten_hashes, forgotten_mask
    from data_contracts.schema import EVENT_COLUMNS
    from ground.settings import privacy_key
    from ingestion.labels import summary_of_counts, untrainable_reason_of
    from ingestion.labels_spark import labels_on_spark

    spark = SparkResource()
    hashes, key = forgotten_hashes(store), privacy_key(Settings.from_env())
    mask = (lambda users: forgotten_mask(users, hashes, key).to_numpy()) if hashes else None
    catalog = store.read(ITEMS, columns=["item_id"])["item_id"].tolist() if store.exists(ITEMS) else None
    events = spark.read_table(store, SILVER, pin.version).select(*EVENT_COLUMNS)
    out = labels_on_spark(spark.session(), events, to_dataclass(config, LabelConfig), catalog, mask, n_rows=pin.rows)
    try:
        kinds = {r["negative_kind"]: (int(r["n"]), int(r["pos"])) for r in out.frame.groupBy("negative_kind").agg(
            F.count(F.lit(1)).alias("n"), F.sum("label_binary").alias("pos")).collect()}
        rows, positives = sum(n for n, _ in kinds.values()), sum(p for _, p in kinds.values())
        if not positives:
            types = {r["event_type"]: int(r["count"]) for r in events.groupBy("event_type").count().collect()}
            raise Failure(description=untrainable_reason_of(types, rows, config.click_is_positive))
        written = spark.write_table(store, LABELS, out.frame)
    finally:
        out.frame.unpersist()
    return _labels_result(config, summary_of_counts(rows, positives, {k: n for k, (n, _) in kinds.items()}), positives,
                          pin.version, written.version, out.as_of_ms, out.forgotten, "spark")


def _labels_result(config: LabelSettings, summary: dict, positives: int, silver_version: int, version: int,
                   as_of: int, forgotten: int, engine: str) -> MaterializeResult:
    """What either engine's labels run reports (one definition, so both publish the same metadata)."""
    return MaterializeResult(metadata={
        **summary, "positives": positives, "engine": engine,
        "silver_version": silver_version, "delta_version": version, "as_of_ms": as_of,
        "attribution_window_hours": config.attribution_window_hours, "easy_negative_ratio": config.easy_negative_ratio,
        "negative_popularity_alpha": config.negative_popularity_alpha, "click_is_positive": config.click_is_positive,
        "forgotten_user_events_excluded": forgotten,
    }, data_version=delta_data_version(LABELS, version))
