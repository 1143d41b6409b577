"""Dual write: the raw events of the stream, in micro-batches, appended to the bronze Delta table.

The batch pipeline (contract -> silver -> labels -> training) then reads exactly the events
the online path saw. Batches are windows of stream time (`window_ms` of stream-id milliseconds,
a divisor of a day, so a batch never spans two ingest days). A window is written only once it
is closed (Redis' clock, which mints the ids, has passed its end), so its content never changes:

    batch id = "<stream>:<first id>..<last id>"   (the stream id range of the window)

`DeltaLake.write_batch` records the batch's content hash as a Delta app transaction, so writing
the same window again (a crash after the commit, a second writer, a replay) adds no version and no
row. Progress is the last-delivered id of the consumer group `kairos-bronze` (XGROUP SETID after
the commit): the stream's retention policy (streaming/retention.py) never trims an entry bronze
has not landed, and the group's lag is the stream -> table lag metric.

Bronze rows: every EVENT_SCHEMA column from the event JSON (wrong types become null and the
batch contract quarantines them, as for any source), `source` defaulting to "stream",
`received_at` = the stream id's milliseconds (when Redis accepted it) and `ingest_date` its UTC
day. Entries that are not JSON objects cannot be rows; they are counted (the sessionizer
quarantines them with a reason).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import redis

import pyarrow as pa

from ground.settings import redis_client
from ingestion.refine import event_dates
from data_contracts.schema import BRONZE_SCHEMA, DAY_MS, EVENT_SCHEMA
from streaming.intake import DEAD_LETTER_STREAM, QUARANTINE_STREAM
from streaming.retention import as_text as _s, ensure_group, parse_id, server_time_ms, trim_processed

log = logging.getLogger("kairos.streaming.bronze")

BRONZE_TABLE = "bronze_events"  # = assets.ingestion.BRONZE (tests/test_streaming_bronze.py checks they agree)
BRONZE_GROUP = "kairos-bronze"
LANDER_GROUP = "kairos-lander"  # reads the quarantine and dead-letter streams into their Delta tables
QUARANTINE_TABLE = "stream_quarantine"
DEAD_LETTER_TABLE = "stream_dead_letter"
# one row per refused (quarantine) or failed (dead-letter) stream entry, with its reason
REFUSED_SCHEMA = pa.schema([("entry_id", pa.string()), ("event", pa.string()), ("reason", pa.string()),
                            ("source_stream_id", pa.string()), ("consumer", pa.string()), ("ts_ms", pa.int64()),
                            ("received_at", pa.int64()), ("ingest_date", pa.string())])
# default only: the streaming CLI takes KAIROS_BRONZE_WINDOW_MS / --bronze-window-ms (streaming/options.py)
DEFAULT_WINDOW_MS = 10_000
LOCK_TTL_MS = 10_000  # a writer killed with the lock held is replaced after this long
_MAX_SEQ = 18446744073709551615

_INT_COLUMNS = [f.name for f in EVENT_SCHEMA if str(f.type) == "int64"]
_STR_COLUMNS = [f.name for f in EVENT_SCHEMA if str(f.type) == "string"]




def _as_int(v: Any) -> int | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)) and np.isfinite(v):
        return int(v)
    return None


def bronze_rows(entries: list[tuple[Any, Any]], default_source: str = "stream") -> tuple[pd.DataFrame, int]:
    """Stream entries -> bronze rows (BRONZE_SCHEMA columns, in stream order) and how many entries
    could not be rows (not a JSON object)."""
    rows: list[dict[str, Any]] = []
    unusable = 0
    for entry_id, fields in entries:
        fields = {_s(k): _s(v) for k, v in (fields or {}).items()}
        try:
            event = json.loads(fields.get("event") or "")
        except (TypeError, ValueError, RecursionError):  # RecursionError: nested past the parser's depth
            event = None
        if not isinstance(event, dict):
            unusable += 1
            continue
        row: dict[str, Any] = {c: (None if event.get(c) is None else str(event.get(c))) for c in _STR_COLUMNS}
        row.update({c: _as_int(event.get(c)) for c in _INT_COLUMNS})
        row["source"] = row["source"] or default_source
        row["received_at"] = parse_id(_s(entry_id))[0]
        rows.append(row)
    frame = pd.DataFrame(rows, columns=[c for c in BRONZE_SCHEMA.names if c != "ingest_date"])
    for c in _INT_COLUMNS:
        frame[c] = frame[c].astype("Int64")
    frame["received_at"] = frame["received_at"].astype("int64")
    frame["ingest_date"] = event_dates(frame["received_at"].to_numpy()) if len(frame) else pd.Series(dtype=object)
    return frame[BRONZE_SCHEMA.names], unusable


def refused_rows(entries: list[tuple[Any, Any]], default_source: str = "") -> tuple[pd.DataFrame, int]:
    """Quarantine / dead-letter stream entries -> REFUSED_SCHEMA rows (the raw event kept as text), in order."""
    rows = []
    for entry_id, fields in entries:
        fields = {_s(k): _s(v) for k, v in (fields or {}).items()}
        ts = fields.get("ts_ms") or ""
        received = parse_id(_s(entry_id))[0]
        rows.append({"entry_id": _s(entry_id), "event": fields.get("event"), "reason": fields.get("reason"),
                     "source_stream_id": fields.get("stream_id") or None, "consumer": fields.get("consumer"),
                     "ts_ms": int(ts) if ts.isdigit() else received, "received_at": received})
    frame = pd.DataFrame(rows, columns=[c for c in REFUSED_SCHEMA.names if c != "ingest_date"])
    frame["ts_ms"] = frame["ts_ms"].astype("int64")
    frame["received_at"] = frame["received_at"].astype("int64")
    frame["ingest_date"] = event_dates(frame["received_at"].to_numpy()) if len(frame) else pd.Series(dtype=object)
    return frame[REFUSED_SCHEMA.names], 0


def window_of(ms: int, window_ms: int) -> tuple[int, int]:
    """[start, end) of the stream-time window holding `ms`."""
    start = ms - ms % window_ms
    return start, start + window_ms


@dataclass(frozen=True)
class BronzeBatch:
    batch_id: str
    first_id: str
    last_id: str
    rows: int
    unusable: int
    delta_version: int
    skipped: bool  # the same window was already written: no new version, no new rows


class BronzeWriter:
    """Lands closed windows of the stream in bronze, idempotently; one active writer per stream (a Redis lock)."""

    def __init__(self, client: Any, lake: Any, stream: str, window_ms: int = DEFAULT_WINDOW_MS,
                 table: str = BRONZE_TABLE, group: str = BRONZE_GROUP, owner: str | None = None,
                 lock_ttl_ms: int = LOCK_TTL_MS, rows=bronze_rows, schema: pa.Schema = BRONZE_SCHEMA,
                 trim: bool = False) -> None:
        if window_ms <= 0 or DAY_MS % window_ms:
            raise ValueError(f"bronze window {window_ms} ms must divide a day (86400000 ms), e.g. 1000, 5000, 10000, "
                             "60000, so a micro-batch never spans two ingest days")
        self.client, self.lake, self.stream = client, lake, stream
        self.window_ms, self.table, self.group, self.lock_ttl_ms = window_ms, table, group, lock_ttl_ms
        self.rows, self.schema, self.trim = rows, schema, trim  # trim: this writer is the stream's only reader
        self.owner = owner or f"bronze-{os.uname().nodename}-{os.getpid()}"
        self.lock_key = f"kairos:bronze:lock:{stream}"
        self._renew = client.register_script(
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0")
        self.stats = {"batches": 0, "rows": 0, "skipped": 0, "unusable": 0}

    def ensure_group(self) -> None:
        """The group starts at the stream's beginning: every entry already there is owed to bronze."""
        ensure_group(self.client, self.stream, self.group)

    def acquire(self) -> bool:
        """Take or keep the writer lock (two writers would race on the same Delta commits)."""
        if self.client.set(self.lock_key, self.owner, nx=True, px=self.lock_ttl_ms):
            return True
        return bool(self._renew(keys=[self.lock_key], args=[self.owner, self.lock_ttl_ms]))

    def release(self) -> None:
        if _s(self.client.get(self.lock_key)) == self.owner:
            self.client.delete(self.lock_key)

    def cursor(self) -> str:
        """The last stream id landed in bronze (the group's last-delivered id).

        A missing group (Redis wiped or restored without it) is re-created at the stream's beginning with an
        alert: whatever is still in the stream is owed to bronze, and re-landing a window is a no-op (its
        batch id and content are the same), so re-created means caught up again, never "missing" forever."""
        try:
            groups = self.client.xinfo_groups(self.stream)
        except redis.ResponseError:  # the stream itself is gone
            groups = []
        for g in groups:
            if _s(g.get("name")) == self.group:
                return _s(g.get("last-delivered-id") or "0-0")
        self.ensure_group()
        self.stats["groups_recreated"] = self.stats.get("groups_recreated", 0) + 1
        log.error("ALERT consumer group %s was missing on %s (Redis lost its data?): re-created at the stream's "
                  "beginning; bronze re-lands what is still in the stream", self.group, self.stream)
        return "0-0"

    def flush_once(self) -> BronzeBatch | None:
        """Write the oldest closed window after the cursor; None when there is none yet."""
        cursor = self.cursor()
        head = self.client.xrange(self.stream, min="(" + cursor if cursor != "0-0" else "-", max="+", count=1)
        if not head:
            return None
        start, end = window_of(parse_id(_s(head[0][0]))[0], self.window_ms)
        info = self.client.xinfo_stream(self.stream)
        newest = parse_id(_s(info.get("last-generated-id") or "0-0"))[0]
        if max(server_time_ms(self.client), newest) < end:
            return None  # the window may still receive entries
        # always the whole window, even if the cursor points inside it (set by hand): its batch id and content
        # are then those of the original write (a no-op), or it lands rows nobody wrote; never a partial window
        entries = self.client.xrange(self.stream, min=f"{start}-0", max=f"{end - 1}-{_MAX_SEQ}")
        first, last = _s(entries[0][0]), _s(entries[-1][0])
        frame, unusable = self.rows(entries)
        day = event_dates(np.array([start]))[0]
        batch_id = f"{self.stream}:{first}..{last}"
        if len(frame):
            out = self.lake.write_batch(self.table, frame, batch_id=batch_id, schema=self.schema,
                                        replace_where=f"ingest_date = '{day}' AND received_at >= {start} "
                                                      f"AND received_at < {end}",
                                        partition_by=["ingest_date"],
                                        commit_properties={"stream": self.stream, "first_id": first, "last_id": last})
            version, skipped = out.version, out.skipped
        else:  # nothing but unusable entries (quarantined by the sessionizer): no empty Delta version
            version, skipped = (self.lake.version(self.table) if self.lake.exists(self.table) else -1), True
        self.client.xgroup_setid(self.stream, self.group, last)  # after the commit: a crash in between replays
        if self.trim:
            trim_processed(self.client, self.stream, required=(self.group,))
        batch = BronzeBatch(batch_id, first, last, len(frame), unusable, version, skipped)
        self.stats["batches"] += 1
        self.stats["rows"] += 0 if skipped else len(frame)
        self.stats["skipped"] += int(skipped)
        self.stats["unusable"] += unusable
        log.info("bronze %s: %d rows%s -> %s v%s", batch_id, len(frame), " (already written)" if skipped else "",
                 self.table, version)
        return batch

    def flush(self, max_batches: int = 1000) -> list[BronzeBatch]:
        """Write every closed window (up to max_batches) while holding the writer lock."""
        out: list[BronzeBatch] = []
        if not self.acquire():
            return out
        while len(out) < max_batches:
            batch = self.flush_once()
            if batch is None:
                break
            out.append(batch)
            self.acquire()  # keep the lock through a long catch-up
        return out

    def run_forever(self, stop: threading.Event, every_s: float | None = None,
                    companions: "list[BronzeWriter] | None" = None) -> None:
        """Flush closed windows until `stop` (and those of `companions`: the quarantine and dead-letter landers);
        survives Redis and storage hiccups (the same window is retried)."""
        every_s = every_s if every_s is not None else min(self.window_ms / 2000.0, 5.0)
        writers = [self, *(companions or [])]
        backoff = 0.5
        try:
            while not stop.is_set():
                try:
                    for writer in writers:
                        writer.ensure_group()
                        writer.flush()
                    backoff = 0.5
                    stop.wait(every_s)
                except Exception as exc:  # noqa: BLE001 - keep the job alive; the same window is retried
                    log.warning("bronze dual write failed (retrying in %.1fs): %s: %s", backoff, type(exc).__name__, exc)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            for writer in writers:
                try:
                    writer.release()
                except redis.RedisError:
                    pass


def refused_landers(client: Any, lake: Any, window_ms: int, owner: str | None = None,
                    lock_ttl_ms: int = LOCK_TTL_MS) -> list[BronzeWriter]:
    """Writers that land the quarantine and dead-letter streams in Delta (stream_quarantine, stream_dead_letter),
    windowed and idempotent like bronze, and trim what they landed: the stream's 100k cap is a memory guard, the
    Delta table is the record (replayable with its reason)."""
    return [BronzeWriter(client, lake, stream, window_ms=window_ms, table=table, group=LANDER_GROUP, owner=owner,
                         lock_ttl_ms=lock_ttl_ms, rows=refused_rows, schema=REFUSED_SCHEMA, trim=True)
            for stream, table in ((QUARANTINE_STREAM, QUARANTINE_TABLE), (DEAD_LETTER_STREAM, DEAD_LETTER_TABLE))]


def _writer_main(redis_url: str, root: str, storage_options: dict | None, stream: str, window_ms: int, owner: str,
                 lock_ttl_ms: int, stop: Any, results: Any, parent_pid: int) -> None:
    """Entry point of the writer process; it stops with its parent (SIGKILL included: the parent pid changes)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from lake.delta import DeltaLake

    client = redis_client(redis_url, socket_timeout=5, socket_connect_timeout=5)  # password/TLS from env, as the job
    writer = BronzeWriter(client, DeltaLake(root, storage_options), stream, window_ms=window_ms, owner=owner,
                          lock_ttl_ms=lock_ttl_ms)

    def orphan_watch() -> None:
        while not stop.wait(0.5):
            if os.getppid() != parent_pid:
                log.warning("bronze writer: the streaming job (pid %s) is gone; stopping", parent_pid)
                stop.set()

    threading.Thread(target=orphan_watch, daemon=True).start()
    landers = refused_landers(client, writer.lake, window_ms, owner, lock_ttl_ms)
    writer.run_forever(stop, companions=landers)
    results.put({**writer.stats, "landed_refused": sum(w.stats["rows"] for w in landers)})


class WriterProcess:
    """The bronze writer in its own process, so its JSON parsing and Arrow conversion never hold the GIL the
    sessionizer needs (session freshness is the latency-critical path; the dual write is not)."""

    def __init__(self, redis_url: str, lake: Any, stream: str, window_ms: int, owner: str,
                 lock_ttl_ms: int = LOCK_TTL_MS) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.stop = ctx.Event()
        self.results = ctx.Queue()
        self.process = ctx.Process(target=_writer_main, name="kairos-bronze", daemon=True,
                                   args=(redis_url, lake.root, lake.storage_options, stream, window_ms, owner,
                                         lock_ttl_ms, self.stop, self.results, os.getpid()))

    def start(self) -> "WriterProcess":
        self.process.start()
        return self

    def close(self, timeout_s: float = 60.0) -> dict | None:
        """Stop after the current window and return the writer's counters (None if it did not answer)."""
        self.stop.set()
        try:
            stats = self.results.get(timeout=timeout_s)
        except queue.Empty:
            stats = None
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.terminate()
        return stats


__all__ = ["BRONZE_GROUP", "BRONZE_TABLE", "DEAD_LETTER_TABLE", "LANDER_GROUP", "QUARANTINE_TABLE", "REFUSED_SCHEMA",
           "BronzeBatch", "BronzeWriter", "WriterProcess", "bronze_rows", "refused_landers", "refused_rows",
           "window_of"]
