"""Bronze → silver for one ingest batch: contract, deduplication, bot filtering.

Every input row ends in exactly one place (DESIGN invariant 3):
  accepted (silver) | quarantined by the contract | duplicate | bot-filtered,
and every rejected row, whatever the cause, is kept in the quarantine table with
its reason(s), raw payload, run id and a `disposition` (contract, duplicate, bot).
So `n_in == accepted + quarantined + duplicates + bot_filtered` always, and the
reject of any event can be explained and replayed.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from data_contracts.event_rules import DEFAULT_MAX_FUTURE_SKEW_MS
from data_contracts.events import QUARANTINE_SCHEMA, ContractResult, validate_events
from ingestion.bots import BOT_SESSION_COLUMNS, BotConfig, bot_mask, bot_sessions
from ingestion.dedup import DEFAULT_WINDOW_MS, exact_duplicates, window_duplicates
from data_contracts.schema import DAY_MS, EVENT_COLUMNS, EVENT_SCHEMA

# Lake columns added to the event schema: the day an event happened (partition) and the batch it arrived in.
SILVER_SCHEMA: pa.Schema = pa.schema(list(EVENT_SCHEMA) + [("event_date", pa.string()), ("ingest_date", pa.string())])
REJECT_SCHEMA: pa.Schema = pa.schema(list(QUARANTINE_SCHEMA) + [("disposition", pa.string()), ("ingest_date", pa.string())])
DISPOSITIONS: tuple[str, ...] = ("contract", "duplicate", "bot")


@dataclass(frozen=True)
class RefineConfig:
    dedup_window_ms: int = DEFAULT_WINDOW_MS
    bots: BotConfig = field(default_factory=BotConfig)
    max_future_skew_ms: int = DEFAULT_MAX_FUTURE_SKEW_MS


@dataclass
class RefineResult:
    accepted: pd.DataFrame   # SILVER_SCHEMA
    rejected: pd.DataFrame   # REJECT_SCHEMA: contract failures, duplicates and bot events
    n_in: int
    quarantined: int
    duplicates: int
    bot_filtered: int
    contract: ContractResult
    bots: pd.DataFrame = field(repr=False, default_factory=lambda: pd.DataFrame(columns=BOT_SESSION_COLUMNS))
    duplicate_reasons: dict[str, int] = field(default_factory=dict)

    def reconciles(self) -> bool:
        """Nothing lost: in = accepted + quarantined + duplicates + bot-filtered, and every reject is stored."""
        parts = len(self.accepted) + self.quarantined + self.duplicates + self.bot_filtered
        return self.n_in == parts and len(self.rejected) == self.quarantined + self.duplicates + self.bot_filtered

    def counts(self) -> dict[str, int]:
        return {"in": self.n_in, "accepted": len(self.accepted), "quarantined": self.quarantined,
                "duplicates": self.duplicates, "bot_filtered": self.bot_filtered, "bot_sessions": len(self.bots)}


def event_dates(timestamps: pd.Series | np.ndarray) -> np.ndarray:
    """UTC calendar day (YYYY-MM-DD) of epoch-ms timestamps; fast for millions of rows (one strftime per day)."""
    days = np.asarray(timestamps, dtype="int64") // DAY_MS
    uniq, inverse = np.unique(days, return_inverse=True)
    names = pd.to_datetime(uniq * DAY_MS, unit="ms", utc=True).strftime("%Y-%m-%d").to_numpy(dtype=object)
    return names[inverse]


def _payload_json(rows: pd.DataFrame) -> list[str]:
    if rows.empty:
        return []
    text = rows.to_json(orient="records", lines=True, force_ascii=False)
    return text.rstrip("\n").split("\n")


def _rejects(rows: pd.DataFrame, reasons: np.ndarray | list[str], disposition: str, run_id: str,
             ingest_date: np.ndarray | str, now_ms: int) -> pd.DataFrame:
    """Accepted-shape rows (EVENT_COLUMNS) turned into quarantine rows with a reason and a disposition."""
    out = rows[EVENT_COLUMNS].reset_index(drop=True).copy()
    out["reasons"] = list(reasons)
    out["raw_payload"] = _payload_json(rows[EVENT_COLUMNS])
    out["run_id"] = run_id
    out["quarantined_at"] = np.int64(now_ms)
    out["disposition"] = disposition
    out["ingest_date"] = ingest_date
    return out


def _typed(frame: pd.DataFrame, schema: pa.Schema) -> pd.DataFrame:
    """Columns in schema order with Arrow-stable dtypes (nullable ints, strings), whatever the input."""
    cols = {}
    for f in schema:
        col = frame[f.name] if f.name in frame else pd.Series([None] * len(frame), index=frame.index)
        if pa.types.is_integer(f.type):
            cols[f.name] = pd.to_numeric(col, errors="coerce").astype("Int64")
        else:
            cols[f.name] = col.astype(object).where(col.notna(), None)
    return pd.DataFrame(cols, index=frame.index).reset_index(drop=True)


SEEN_BEFORE_REASON = "duplicate_event_id: seen in an earlier batch"


def window_reason(config: RefineConfig) -> str:
    return (f"duplicate_within_window: same user, item, event type and session within "
            f"{config.dedup_window_ms // 1000}s")


@dataclass
class Judgement:
    """What happened to each contract-valid row of a batch: bot, duplicate of an earlier batch, window duplicate."""

    bots: pd.DataFrame          # the bot sessions (BOT_SESSION_COLUMNS)
    is_bot: np.ndarray          # over the valid rows
    bot_reasons: np.ndarray     # over the valid rows ("" for humans)
    seen_before: np.ndarray     # over the humans (valid[~is_bot]): event_id already in an earlier batch
    in_window: np.ndarray       # over the rest (humans[~seen_before]): a repeat within the dedup window


def judge_valid(valid: pd.DataFrame, prior: pd.DataFrame | None, config: RefineConfig,
                seen_before: np.ndarray | None = None) -> Judgement:
    """The post-contract rules of one batch over its contract-valid rows, in their order: bots first (a script's
    retries and repeats are part of its velocity), then event ids seen in an earlier batch (`prior`), then
    repeats within the window. Every rule groups by user (bots by user and session, the window by user, item,
    type and session), so any set of whole users can be judged apart (the Spark engine judges user buckets);
    only the event-id lookup is global, which is why a caller may pass it in (`seen_before`, over `valid`)."""
    bots = bot_sessions(valid, config.bots)
    is_bot, bot_reasons = bot_mask(valid, bots)
    humans = valid[~is_bot]
    if seen_before is None:
        seen = exact_duplicates(humans, prior) & ~humans["event_id"].duplicated(keep="first").to_numpy()
    else:
        seen = np.asarray(seen_before, dtype=bool)[~is_bot]
    in_window = window_duplicates(humans[~seen], prior, config.dedup_window_ms)
    return Judgement(bots=bots, is_bot=is_bot, bot_reasons=bot_reasons, seen_before=seen, in_window=in_window)


def refine_batch(raw: pd.DataFrame, ingest_date: str, run_id: str, prior: pd.DataFrame | None = None,
                 now_ms: int | None = None, config: RefineConfig = RefineConfig(),
                 contract: ContractResult | None = None, ingest_dates: np.ndarray | None = None) -> RefineResult:
    """Judge one ingest batch. `prior`: silver rows of earlier batches that may hold its duplicates.

    `contract`: this batch's share of a GX run over several batches (ContractResult.split), so a
    many-day backfill pays for one GX pass; by default the batch is validated here.
    `ingest_dates`: a batch of several ingest days (a backfill) stamps each row with its own day; the
    array is indexed by the contract's input positions (the whole GX run's rows when `contract` is a
    share of it, else `raw`'s rows). Without it every row gets `ingest_date`.
    """
    now_ms = int(time.time() * 1000) if now_ms is None else int(now_ms)
    if contract is None:
        contract = validate_events(raw, run_id=run_id, now_ms=now_ms, max_future_skew_ms=config.max_future_skew_ms)
    elif contract.n_in != len(raw):
        raise ValueError(f"the contract result covers {contract.n_in} rows but the batch has {len(raw)}")

    def day_of(kind: str) -> np.ndarray | str:
        return ingest_date if ingest_dates is None else np.asarray(ingest_dates, dtype=object)[contract.positions[kind]]

    valid = contract.accepted
    valid_day = day_of("accepted")

    def valid_days(rows: pd.DataFrame) -> np.ndarray | str:  # rows: a subset of `valid` (its index kept)
        return valid_day if isinstance(valid_day, str) else valid_day[rows.index.to_numpy()]

    parts: list[pd.DataFrame] = []
    if len(contract.quarantined):
        q = contract.quarantined.copy()
        q["disposition"], q["ingest_date"] = "contract", day_of("quarantined")
        parts.append(q)

    dup_reasons: dict[str, int] = {"duplicate_event_id": contract.duplicates}
    if contract.duplicate_rows is not None and len(contract.duplicate_rows):
        parts.append(_rejects(contract.duplicate_rows, ["duplicate_event_id"] * len(contract.duplicate_rows),
                              "duplicate", run_id, day_of("duplicates"), now_ms))
    j = judge_valid(valid, prior, config)
    is_bot, seen_before, in_window = j.is_bot, j.seen_before, j.in_window
    bots, humans, rest = j.bots, valid[~is_bot], valid[~is_bot][~seen_before]
    if is_bot.any():
        parts.append(_rejects(valid[is_bot], j.bot_reasons[is_bot], "bot", run_id, valid_days(valid[is_bot]), now_ms))
    if seen_before.any():
        parts.append(_rejects(humans[seen_before], [SEEN_BEFORE_REASON] * int(seen_before.sum()),
                              "duplicate", run_id, valid_days(humans[seen_before]), now_ms))
    dup_reasons["duplicate_event_id"] += int(seen_before.sum())
    if in_window.any():
        parts.append(_rejects(rest[in_window], [window_reason(config)] * int(in_window.sum()), "duplicate", run_id,
                              valid_days(rest[in_window]), now_ms))
    dup_reasons["duplicate_within_window"] = int(in_window.sum())
    accepted = rest[~in_window].copy()
    accepted["event_date"] = event_dates(accepted["timestamp"]) if len(accepted) else []
    accepted["ingest_date"] = valid_days(accepted)
    rejected = pd.concat([_typed(p, REJECT_SCHEMA) for p in parts], ignore_index=True) if parts \
        else _typed(pd.DataFrame(columns=REJECT_SCHEMA.names), REJECT_SCHEMA)
    return RefineResult(
        accepted=_typed(accepted, SILVER_SCHEMA), rejected=rejected, n_in=len(raw),
        quarantined=len(contract.quarantined), duplicates=contract.duplicates + int(seen_before.sum()) + int(in_window.sum()),
        bot_filtered=int(is_bot.sum()), contract=contract, bots=bots, duplicate_reasons=dup_reasons,
    )


def bot_report(bots: pd.DataFrame, limit: int = 20) -> str:
    """JSON list of the filtered sessions and their figures (for asset metadata)."""
    return json.dumps(bots.head(limit).to_dict("records"), default=str)


__all__ = ["DISPOSITIONS", "SEEN_BEFORE_REASON", "Judgement", "judge_valid", "window_reason", "REJECT_SCHEMA", "SILVER_SCHEMA", "RefineConfig", "RefineResult", "bot_report", "event_dates",
           "refine_batch"]
