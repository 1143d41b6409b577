"""Bronze → silver on Spark: the same rules as `refine_batch`, run on executors, memory bounded per partition.

One rule set, two engines. The pandas engine (`refine_batch`) judges a batch in one process; this one runs the
same rules on Spark executors, with one full shuffle (by user) and Python only for the few keys with a repeat
inside the dedup window:

1. contract: `event_rules` compiled to Spark column expressions (data_contracts.event_rules_spark: the same rule
   definitions GX's suite is built from, read the way GX reads a row), so each row's verdict and reasons are
   computed in the JVM; the judged bronze is persisted and the first job reads it once (per-day counts and
   event-time ranges). The driver sees no row.
2. repeated event ids over the whole range (first arrival wins, the pandas contract's `duplicated(keep="first")`
   on rows sorted by arrival): an aggregate over the ids alone finds the repeated ones (broadcast when they are
   up to `BROADCAST_IDS`), and only their rows are ranked by arrival; ids already in silver (earlier ingest days,
   within the lookback): a join, per batch's event-day range.
3. the shuffle, by user_id (the prior silver rows with them): bots as Spark expressions built from `BotConfig`
   (a range window counts clicks per session, `median` dwell, `bot_reason_format`), no exchange of their own.
4. repeats within the dedup window: a window over DEDUP_KEY by time finds the keys with two events closer than
   the window (`window_duplicates`' own pre-filter); only those go to Python (`_window_walk`: the same
   `window_duplicates`, batch by batch, against the key's prior silver and what its earlier batches kept, exactly
   what `_prior_silver` hands the pandas engine); every other row is accepted without leaving the JVM.
5. silver and quarantine are written by the executors (`lake.spark.spark_write`, replacing the run's days);
   only file lists, counts and the bot sessions reach the driver. The rejects (few) are persisted for their
   counts and their write; the accepted rows are counted and written from the frames persisted above.

GX stays the validator of record for the report: the data docs are rendered from a `DOCS_SAMPLE_ROWS` sample
validated by GX on the driver (assets.ingestion); the per-rule failure counts cover the whole range. Each phase's
wall time is logged (`ground.phases`, logger kairos.spark).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from data_contracts.event_rules import event_rules
from data_contracts.event_rules_spark import contract_columns
from data_contracts.schema import DAY_MS, EVENT_COLUMNS, EVENT_SCHEMA
from ingestion.bots import BOT_SESSION_COLUMNS, bot_reason_format
from ingestion.dedup import DEDUP_KEY, window_duplicates
from ground.phases import Phases
from ingestion.refine import REJECT_SCHEMA, SEEN_BEFORE_REASON, SILVER_SCHEMA, RefineConfig, event_dates, window_reason

log = logging.getLogger("kairos.spark")

BROADCAST_IDS = 1_000_000      # repeated event ids up to this many are broadcast (no shuffle of the rows)
USER_PARTITION_ROWS = 500_000  # about this many events per partition of users (the windows' and writers' tasks)
DOCS_SAMPLE_ROWS = 20_000      # bronze rows the data docs are rendered from on the driver (a second GX run there)
_INT = {f.name for f in EVENT_SCHEMA if str(f.type) == "int64"}
_EVENT_DDL = ", ".join(f"{c} {'long' if c in _INT else 'string'}" for c in EVENT_COLUMNS)

@dataclass
class SparkRefineResult:
    totals: dict[str, int]
    per_batch: list[dict[str, Any]]
    duplicate_reasons: dict[str, int]
    expectation_failures: dict[str, int]
    bots: pd.DataFrame
    silver_version: int
    quarantine_version: int
    sample: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)  # bronze rows for the data docs


WALK_DDL = f"{_EVENT_DDL}, received_at long, ingest_date string, batch int, event_date string, in_window boolean"
WALK_COLUMNS = [c.strip().split(" ")[0] for c in WALK_DDL.split(",")]


def _window_walk(info: dict[int, tuple[str | None, str | None]], window_ms: int):
    """Repeats within the dedup window over a bucket of *suspect* action keys (DEDUP_KEY groups holding two events
    closer than the window, found by a Spark window): `window_duplicates`, the pandas engine's rule, walked batch
    by batch against the key's prior silver rows and what its earlier batches kept (the pandas engine's `prior`,
    restricted to these keys; any other key has no repeat, so it is accepted without a Python call)."""
    def judge(rows: pd.DataFrame) -> pd.DataFrame:
        rows = rows.sort_values(["batch", "ingest_date", "received_at", "event_id"], kind="mergesort")
        prior = rows[rows["batch"] < 0]
        kept: list[pd.DataFrame] = [prior]
        out: list[pd.DataFrame] = []
        for b in sorted(int(x) for x in rows.loc[rows["batch"] >= 0, "batch"].unique()):
            mine = rows[rows["batch"] == b].reset_index(drop=True)
            lo, hi = info[b]
            pool = None
            if lo is not None and hi is not None:
                pool = pd.concat(kept, ignore_index=True)
                pool = pool[(pool["event_date"] >= lo) & (pool["event_date"] <= hi)]
            dup = window_duplicates(mine, pool if pool is not None and len(pool) else None, window_ms)
            kept.append(mine[~dup])
            out.append(mine.assign(in_window=dup))
        if not out:
            return pd.DataFrame({c: pd.Series([], dtype=object) for c in WALK_COLUMNS})
        done = pd.concat(out, ignore_index=True)
        typed = {}
        for c in WALK_COLUMNS:
            col = done[c]
            if c in _INT or c in ("received_at", "batch"):
                typed[c] = pd.to_numeric(col, errors="coerce").astype("Int64")
            elif c == "in_window":
                typed[c] = col.astype(bool)
            else:
                typed[c] = col.astype(object).where(col.notna(), None)
        return pd.DataFrame(typed)
    return judge


def refine_on_spark(spark: Any, store: Any, bronze: str, silver: str, quarantine: str, bronze_version: int,
                    days: list[str], batches: list[list[str]], run_id: str, now_ms: int, config: RefineConfig,
                    lookback_days: int) -> SparkRefineResult:
    """Judge the run's bronze days on Spark and write silver + quarantine (module docstring)."""
    from pyspark import StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from lake.spark_read import spark_read
    from lake.spark_write import spark_write

    phases = Phases("silver (spark)", log)
    # (the parquet reader infers a `ingest_date=YYYY-MM-DD` folder as a date: the lake's type is a string)
    raw = (spark_read(spark, store, bronze, bronze_version).withColumn("ingest_date", F.col("ingest_date").cast("string"))
           .where(F.col("ingest_date").isin(days)))
    batch_of = {d: i for i, bd in enumerate(batches) for d in bd}
    batch_map = F.create_map(*[x for d, i in batch_of.items() for x in (F.lit(d), F.lit(i))])
    # the contract: event_rules compiled to Spark expressions (data_contracts.event_rules_spark), judged in the JVM
    values, reasons = contract_columns(raw, event_rules(now_ms, config.max_future_skew_ms))
    received = [c for c in raw.columns if c != "ingest_date"]  # what was received: a contract reject's raw_payload
    rejected = F.col("reasons").isNotNull()
    staged = (raw.select(*[values[c].alias(c) for c in EVENT_COLUMNS], F.col("received_at").cast("long"),
                         "ingest_date", reasons.alias("reasons"),
                         F.when(reasons.isNotNull(), F.to_json(F.struct(*[F.col(c) for c in received]),
                                                               {"ignoreNullFields": "false"})).alias("raw_payload"))
              .withColumn("role", F.when(rejected, F.lit("contract")).otherwise(F.lit("valid")))
              .withColumn("quarantined_at", F.when(rejected, F.lit(int(time.time() * 1000))).cast("long"))
              .withColumn("batch", batch_map[F.col("ingest_date")].cast("int"))
              .persist(StorageLevel.MEMORY_AND_DISK))
    # the first job reads bronze once and judges it (staged is persisted): per day, its rows and event time range
    stats = {r["ingest_date"]: r for r in staged.groupBy("ingest_date").agg(
        F.count(F.lit(1)).alias("n"),
        F.min(F.when(F.col("timestamp") > 0, F.col("timestamp"))).alias("lo"),
        F.max(F.when(F.col("timestamp") > 0, F.col("timestamp"))).alias("hi")).collect()}
    phases.mark("bronze read, contract, day stats")
    info: dict[int, tuple[str | None, str | None]] = {}
    for i, bd in enumerate(batches):
        los = [int(stats[d]["lo"]) for d in bd if d in stats and stats[d]["lo"] is not None]
        his = [int(stats[d]["hi"]) for d in bd if d in stats and stats[d]["hi"] is not None]
        info[i] = (None, None) if not los else (
            str(event_dates(np.array([min(los) - lookback_days * DAY_MS]))[0]),
            str(event_dates(np.array([max(his) + DAY_MS]))[0]))
    lo_map = F.create_map(*[x for i, (lo, _) in info.items() for x in (F.lit(i), F.lit(lo))])
    hi_map = F.create_map(*[x for i, (_, hi) in info.items() for x in (F.lit(i), F.lit(hi))])

    # repeated event ids over the whole range (first arrival wins): only the ids are shuffled to find the repeats
    # (an aggregate), then only the rows of a repeated id are shuffled by event_id to rank their arrivals
    good = staged.where(F.col("role") == "valid")
    repeated = (good.groupBy("event_id").agg(F.count(F.lit(1)).alias("n")).where(F.col("n") > 1).select("event_id")
                .persist(StorageLevel.MEMORY_AND_DISK))
    few = repeated.count() <= BROADCAST_IDS
    rep = F.broadcast(repeated) if few else repeated
    arrival = Window.partitionBy("event_id").orderBy("ingest_date", "received_at")
    valid = good.join(rep, "event_id", "left_anti").unionByName(
        good.join(rep, "event_id", "left_semi")
        .withColumn("role", F.when(F.row_number().over(arrival) > 1, F.lit("dup_id")).otherwise(F.lit("valid"))))
    phases.mark("repeated event ids")
    event_cols = [F.col(c) for c in EVENT_COLUMNS]
    lows = [lo for lo, _ in info.values() if lo is not None]
    prior = None
    if store.exists(silver) and lows:
        hi_all = max(hi for _, hi in info.values() if hi is not None)
        prior = (spark_read(spark, store, silver, store.version(silver))
                 .withColumn("ingest_date", F.col("ingest_date").cast("string"))
                 .where((F.col("ingest_date") < days[0]) & (F.col("event_date") >= min(lows))
                        & (F.col("event_date") <= hi_all)))
    if prior is not None:
        ids = prior.select(F.col("event_id").alias("pid"), F.col("event_date").alias("pdate"))
        v = valid.where(F.col("role") == "valid").select("event_id", "batch")
        seen = (v.join(ids, (v["event_id"] == ids["pid"]) & (ids["pdate"] >= lo_map[v["batch"]])
                       & (ids["pdate"] <= hi_map[v["batch"]]))
                .select("event_id").distinct().withColumn("seen", F.lit(True)))
        valid = valid.join(seen, "event_id", "left")
    valid = valid.withColumn("seen", F.coalesce(F.col("seen"), F.lit(False)) if prior is not None else F.lit(False))
    rows = valid.select(*event_cols, "received_at", "ingest_date", "role", "batch", "seen",
                        F.date_format(F.timestamp_millis("timestamp"), "yyyy-MM-dd").alias("event_date"))
    if prior is not None:  # the prior silver rows ride along: the window rule below reads them next to this run's
        rows = rows.unionByName(prior.select(*event_cols, F.lit(None).cast("long").alias("received_at"),
                                             F.col("ingest_date"), F.lit("prior").alias("role"),
                                             F.lit(-1).alias("batch"), F.lit(False).alias("seen"), F.col("event_date")))
    # shuffle 2, by user: every later rule groups by user (bots by batch, user and session; the window by user,
    # item, type and session), so each window below runs on these partitions with no further exchange
    n_parts = max(spark.sparkContext.defaultParallelism, sum(int(r["n"]) for r in stats.values()) // USER_PARTITION_ROWS)
    users = rows = rows.repartition(n_parts, "user_id").persist(StorageLevel.MEMORY_AND_DISK)
    users.count()
    phases.mark("event-id ranks, lookback join, user shuffle")
    # bots (ingestion/bots.py, the same thresholds and reason text): per (batch, user, session), the most clicks
    # in any window_ms stretch (a range window) and the median click dwell
    session = ["batch", "user_id", "session_id"]
    bots_cfg = config.bots
    bad = None
    if bots_cfg.enabled:
        span = Window.partitionBy(*session).orderBy("timestamp").rangeBetween(0, bots_cfg.window_ms - 1)
        sessions_of = (rows.where((F.col("role") == "valid") & (F.col("event_type") == "click"))
                       .select(*session, "dwell_time_ms", F.count(F.lit(1)).over(span).alias("in_window"))
                       .groupBy(*session).agg(F.count(F.lit(1)).alias("clicks"),
                                              F.max("in_window").alias("max_clicks_in_window"),
                                              F.coalesce(F.median(F.col("dwell_time_ms").cast("double")),
                                                         F.lit(0.0)).alias("median_dwell_ms")))
        bad = (sessions_of.where((F.col("max_clicks_in_window") >= bots_cfg.max_clicks)
                                 & (F.col("median_dwell_ms") <= bots_cfg.max_median_dwell_ms))
               .withColumn("reason", F.format_string(bot_reason_format(bots_cfg), F.col("max_clicks_in_window"),
                                                     F.bround("median_dwell_ms", 0)))
               .persist(StorageLevel.MEMORY_AND_DISK))
        rows = rows.join(F.broadcast(bad.select(*session, F.col("reason").alias("bot_reason"))), session, "left")
    else:
        rows = rows.withColumn("bot_reason", F.lit(None).cast("string"))
    judged = rows.where(F.col("role") == "valid")
    humans = judged.where(F.col("bot_reason").isNull())
    # repeats within the window: only action keys with two events (this run's or prior silver's) closer than the
    # window can hold one (the pandas rule's own pre-filter); those keys are walked in Python, the rest are kept
    union = rows.where((F.col("role") == "prior") | ((F.col("role") == "valid") & F.col("bot_reason").isNull()
                                                      & ~F.col("seen")))
    key = list(DEDUP_KEY)
    by_time = Window.partitionBy(*key).orderBy("timestamp")
    gap = F.least(F.col("timestamp") - F.lag("timestamp").over(by_time), F.lead("timestamp").over(by_time) - F.col("timestamp"))
    union = (union.withColumn("close", F.coalesce(gap < config.dedup_window_ms, F.lit(False)))
             .withColumn("suspect", F.max("close").over(Window.partitionBy(*key)))
             .persist(StorageLevel.MEMORY_AND_DISK))  # read twice: the keys walked in Python and the clear rest
    walk_cols = [c for c in WALK_COLUMNS if c != "in_window"]
    clear = union.where(~F.col("suspect") & (F.col("role") != "prior")).select(*walk_cols)
    walked = (union.where(F.col("suspect")).select(*walk_cols)
              .withColumn("bucket", F.pmod(F.xxhash64(*key), F.lit(n_parts)))
              .groupBy("bucket").applyInPandas(_window_walk(info, config.dedup_window_ms), WALK_DDL)
              .persist(StorageLevel.MEMORY_AND_DISK))
    walked.count()
    phases.mark("bots, window pre-filter and walk")
    accepted = clear.unionByName(walked.where(~F.col("in_window")).drop("in_window"))

    def rejects(rows: Any, reason: Any, disposition: str) -> Any:
        return rows.select(*event_cols, reason.alias("reasons"),
                           F.to_json(F.struct(*event_cols), {"ignoreNullFields": "false"}).alias("raw_payload"),
                           F.lit(run_id).alias("run_id"), F.lit(now_ms).cast("long").alias("quarantined_at"),
                           F.lit(disposition).alias("disposition"), "ingest_date",
                           F.lit(None).cast("string").alias("event_date"), F.lit(disposition).alias("outcome"), "batch")

    contract_rows = staged.where(F.col("role") == "contract").select(
        *event_cols, "reasons", "raw_payload", F.lit(run_id).alias("run_id"), "quarantined_at",
        F.lit("contract").alias("disposition"), "ingest_date", F.lit(None).cast("string").alias("event_date"),
        F.lit("contract").alias("outcome"), "batch")
    kept = accepted.select(*SILVER_SCHEMA.names)
    parts = [rejects(rows.where(F.col("role") == "dup_id"), F.lit("duplicate_event_id"), "duplicate"),
             rejects(judged.where(F.col("bot_reason").isNotNull()), F.col("bot_reason"), "bot"),
             rejects(humans.where(F.col("seen")), F.lit(SEEN_BEFORE_REASON), "duplicate"),
             rejects(walked.where(F.col("in_window")), F.lit(window_reason(config)), "duplicate"),
             contract_rows]
    rejected_rows = parts[0]
    for part in parts[1:]:
        rejected_rows = rejected_rows.unionByName(part)
    # the rejects are few: persisted once for their counts and their write; the accepted rows are counted and
    # written straight from the persisted frames above (no copy of every row before the writes)
    rejected_rows = rejected_rows.coalesce(n_parts).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = [r.asDict() for r in rejected_rows.groupBy("batch", "outcome").agg(
            F.count(F.lit(1)).alias("n"),
            F.sum(F.when(F.col("reasons").startswith("duplicate_within_window"), 1).otherwise(0)).alias("window"),
        ).collect()]
        counts += [{"batch": r["batch"], "outcome": "accepted", "n": r["count"], "window": 0}
                   for r in accepted.groupBy("batch").count().collect()]
        phases.mark("outcome counts")
        fails = {r["rule"]: int(r["n"]) for r in rejected_rows.where(F.col("outcome") == "contract")
                 .select(F.explode(F.split("reasons", "; ")).alias("rule")).groupBy("rule").count()
                 .withColumnRenamed("count", "n").collect()}
        bot_rows = [] if bad is None else [r.asDict() for r in bad.orderBy(*session).collect()]
        phases.mark("rule failures and bot sessions")
        s = spark_write(spark, store, silver, kept.coalesce(n_parts),
                        commit_properties={"run_id": run_id, "bronze_version": bronze_version, "engine": "spark"},
                        partition_by=["ingest_date"], replace_partitions=days)
        phases.mark("silver write")
        q = spark_write(spark, store, quarantine, rejected_rows.select(*REJECT_SCHEMA.names),
                        commit_properties={"run_id": run_id, "engine": "spark"},
                        partition_by=["ingest_date"], replace_partitions=days)
        phases.mark("quarantine write")
    finally:
        for frame in (rejected_rows, walked, union, users, repeated, staged, bad):
            if frame is not None:
                frame.unpersist()
    per: dict[int, dict[str, int]] = {i: {"accepted": 0, "contract": 0, "duplicate": 0, "bot": 0, "bot_session": 0,
                                          "window": 0} for i in range(len(batches))}
    for r in bot_rows:
        per[int(r["batch"])]["bot_session"] += 1
    for r in counts:
        per[int(r["batch"])][r["outcome"]] += int(r["n"])
        per[int(r["batch"])]["window"] += int(r["window"]) if r["outcome"] == "duplicate" else 0
    totals = {"in": 0, "accepted": 0, "quarantined": 0, "duplicates": 0, "bot_filtered": 0, "bot_sessions": 0}
    per_batch = []
    for i, bd in enumerate(batches):
        p = per[i]
        n_in = sum(int(stats[d]["n"]) for d in bd if d in stats)
        c = {"in": n_in, "accepted": p["accepted"], "quarantined": p["contract"], "duplicates": p["duplicate"],
             "bot_filtered": p["bot"], "bot_sessions": p["bot_session"]}
        for k, val in c.items():
            totals[k] += val
        per_batch.append({"ingest_dates": f"{bd[0]}..{bd[-1]}", "days": len(bd), **c,
                          "reconciles": n_in == p["accepted"] + p["contract"] + p["duplicate"] + p["bot"],
                          "silver_unchanged": False})
    log.info("silver (spark) phases: %s", phases.summary())
    window = sum(p["window"] for p in per.values())
    bots = pd.DataFrame([{**{c: r[c] for c in BOT_SESSION_COLUMNS},
                          "ingest_date": f"{batches[r['batch']][0]}..{batches[r['batch']][-1]}"} for r in bot_rows])
    return SparkRefineResult(totals=totals, per_batch=per_batch,
                             duplicate_reasons={"duplicate_event_id": totals["duplicates"] - window,
                                                "duplicate_within_window": window},
                             expectation_failures=fails, bots=bots, silver_version=s.version,
                             quarantine_version=q.version)


__all__ = ["DOCS_SAMPLE_ROWS", "SparkRefineResult", "refine_on_spark"]
