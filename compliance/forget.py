"""The right to be forgotten: remove one user from every store, keep them out, and record that we did.

`forget_user(settings, user_id, requested_by, reason)`:

1. exclusion list first (Delta `forgotten_users`, keyed hash of the id): from this moment ingestion
   (bronze, catalog) and training (labels) drop the user, so a concurrent or later re-ingest of the
   source cannot bring them back;
2. Redis: the user's hash under every feature-store version, every key naming the user
   (e.g. `kairos:user_recent_cats:{user}`), the session keys of the user's sessions and the
   streaming job's per-event markers, and the user's entries in every Redis stream (events,
   impressions, quarantine; XDEL);
3. Delta: rows with the user's id deleted from every table with a `user_id` column (bronze,
   silver, quarantine, labels, catalog_users, user_features, training_set, impression_log, ...).
   The delete predicate names a sha256 of the id, not the id, so the Delta log does not
   record who was deleted;
4. vacuum policy. A Delta delete only writes a new version: the old parquet files, and so the
   user's rows, stay readable by time travel until they are vacuumed. `retention_hours=0`
   (default, `purge`) vacuums at once with delta-rs' retention check disabled and also
   expires the table's log history (checkpoint + log cleanup), so no older version of any
   table can be read any more, including the versions earlier models were trained on (their
   lineage then reports "files vacuumed"). `retention_hours=H` keeps H hours of time travel
   (vacuum now with H; the weekly `lake_maintenance` finishes the job): the user stays
   readable in old versions until then, and the audit entry says by when they are gone;
5. an audit entry (Delta `privacy_audit`): who asked, why, when, the keyed user hash (not the
   raw id: the audit log must not itself keep the personal data it proves was deleted; the
   hash still lets an auditor check "was user X forgotten?" with the key) and what was deleted
   per store with counts.

In-process caches (a server's stale-features copy, at most KAIROS_STALE_FEATURES_MAX_AGE_S = 1 h)
age out on their own; MLflow models trained before the request still embed the user's id in
their vocabulary until the next retrain (which excludes them) replaces them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa

from compliance.exclusion import COMPLIANCE_TABLES, FORGOTTEN_USERS, PRIVACY_AUDIT, user_hash
from ground.settings import Settings, privacy_key, redis_url_from_env
from ground.settings import redis_client as make_redis_client  # `redis_client` is forget_user's parameter
from lake.delta import DeltaLake
from models.bundle import USER_VOCAB

log = logging.getLogger("kairos.forget")

PURGE = 0  # retention_hours for an immediate purge
SCAN_COUNT = 1000
FORGOTTEN_SCHEMA = pa.schema([("user_hash", pa.string()), ("forgotten_at_ms", pa.int64()), ("request_id", pa.string())])
AUDIT_SCHEMA = pa.schema([("request_id", pa.string()), ("user_hash", pa.string()), ("requested_by", pa.string()),
                          ("reason", pa.string()), ("requested_at_ms", pa.int64()), ("completed_at_ms", pa.int64()),
                          ("retention_hours", pa.float64()), ("purged_by_ms", pa.int64()), ("deleted", pa.string()),
                          ("total_deleted", pa.int64()), ("pending", pa.string())])


# ---------------------------------------------------------------------------------------------- pure
def delete_predicate(user_id: str, column: str = "user_id") -> str:
    """A Delta predicate matching the user's rows that does not spell out the id (it lands in the Delta log)."""
    digest = hashlib.sha256(str(user_id).encode()).hexdigest()
    return f"encode(sha256({column}), 'hex') = '{digest}'"


def glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters so an id is matched literally by SCAN MATCH."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in str(text))


def names_user(key: str, user_id: str) -> bool:
    """True when a Redis key names the user as one of its ':'-separated parts (u0001 does not match u00010)."""
    return str(user_id) in key.split(":")


def user_entry(fields: dict[str, Any], user_id: str) -> dict[str, Any] | None:
    """The user's record in a stream entry: the fields themselves (a `user_id` field), or a JSON field such as
    `event` (streaming job) or `record` (impression log) whose user_id is the user; None otherwise."""
    uid = str(user_id)
    if str(fields.get("user_id", "")) == uid:
        return fields
    for value in fields.values():
        if isinstance(value, str) and value.startswith("{") and f'"{uid}"' in value:
            try:
                doc = json.loads(value)
            except ValueError:
                continue
            if isinstance(doc, dict) and str(doc.get("user_id", "")) == uid:
                return doc
    return None


def entry_mentions_user(fields: dict[str, Any], user_id: str) -> bool:
    return user_entry(fields, user_id) is not None


def audit_row(request_id: str, uhash: str, requested_by: str, reason: str, requested_at_ms: int, completed_at_ms: int,
              retention_hours: float, deleted: dict[str, int], pending: dict[str, Any] | None = None) -> dict[str, Any]:
    """One privacy_audit row: who, why, when, which user (keyed hash), what was deleted where, by when no old
    table version can expose the user any more, and what still holds the user (with the action that clears it)."""
    purged_by = completed_at_ms + int(retention_hours * 3_600_000)
    return {"request_id": request_id, "user_hash": uhash, "requested_by": requested_by, "reason": reason,
            "requested_at_ms": requested_at_ms, "completed_at_ms": completed_at_ms,
            "retention_hours": float(retention_hours), "purged_by_ms": purged_by,
            "deleted": json.dumps(deleted, sort_keys=True), "total_deleted": int(sum(deleted.values())),
            "pending": json.dumps(pending or {}, sort_keys=True)}


def files_naming_user(root: Path, user_id: str, skip: Iterable[Path] = (), max_bytes: int = 64 << 20) -> list[str]:
    """Files under `root` whose bytes spell the user id as a whole token (outside the `skip` folders):
    operational leftovers such as Dagster's event log (asset metadata like the bot-session report), data-docs
    HTML or run logs. Compressed formats are not looked into; files above `max_bytes` are skipped."""
    import re

    token = re.compile(rb"(?<![A-Za-z0-9_])" + re.escape(str(user_id).encode()) + rb"(?![A-Za-z0-9_])")
    skipped = [Path(p).resolve() for p in skip]
    hits = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or any(s == path.resolve() or s in path.resolve().parents for s in skipped):
            continue
        try:
            if path.stat().st_size <= max_bytes and token.search(path.read_bytes()):
                hits.append(str(path.relative_to(root)))
        except OSError:
            continue
    return hits


def model_files_with_user(root: Path, user_id: str) -> list[str]:
    """Model bundles under `root` (training scratch, registry download cache, local MLflow artifacts) whose user
    vocabulary still lists the user: their towers hold the user's embedding until those versions are replaced."""
    hits = []
    for vocab in sorted(root.rglob(USER_VOCAB)):
        try:
            if str(user_id) in json.loads(vocab.read_text()):
                hits.append(str(vocab.parent.relative_to(root)))
        except (ValueError, OSError):
            continue
    return hits


# ---------------------------------------------------------------------------------------------- Delta
def user_tables(lake: DeltaLake, column: str = "user_id") -> list[str]:
    """Every lake table with a user id column (the compliance tables hold hashes only)."""
    out = []
    for table in lake.tables():
        if table in COMPLIANCE_TABLES:
            continue
        if column in [f.name for f in lake._table(table).schema().fields]:
            out.append(table)
    return out


def _user_sessions_and_events(lake: DeltaLake, tables: Iterable[str], user_id: str) -> tuple[set[str], set[str]]:
    sessions: set[str] = set()
    events: set[str] = set()
    for table in tables:
        names = [f.name for f in lake._table(table).schema().fields]
        cols: list[str] = [c for c in ("session_id", "event_id") if c in names]
        if not cols:
            continue
        rows = lake.read(table, columns=cols, filters=[("user_id", "=", str(user_id))])
        if "session_id" in rows:
            sessions.update(str(s) for s in rows["session_id"].dropna().unique())
        if "event_id" in rows:
            events.update(str(e) for e in rows["event_id"].dropna().unique())
    return sessions, events


def purge_history(lake: DeltaLake, table: str) -> None:
    """Expire a table's whole log history now (checkpoint, then log cleanup with zero retention), then restore
    the default log retention so ordinary history keeps working afterwards."""
    dt = lake._table(table)
    previous = (dt.metadata().configuration or {}).get("delta.logRetentionDuration", "interval 30 days")
    dt.alter.set_table_properties({"delta.logRetentionDuration": "interval 0 seconds"})
    dt = lake._table(table)
    dt.create_checkpoint()
    dt.cleanup_metadata()
    lake._table(table).alter.set_table_properties({"delta.logRetentionDuration": previous})


def forget_in_lake(lake: DeltaLake, user_id: str, retention_hours: float,
                   tables: Iterable[str] | None = None, into: dict[str, int] | None = None) -> dict[str, int]:
    """Delete the user's rows from every table with user_id; vacuum by the policy. {table: rows deleted}.

    Counts go into `into` table by table as they are done, so a failure part-way still reports what was deleted.
    """
    deleted: dict[str, int] = {} if into is None else into
    predicate = delete_predicate(user_id)
    for table in (user_tables(lake) if tables is None else tables):
        present = len(lake.read(table, columns=["user_id"], filters=[("user_id", "=", str(user_id))]))
        if present:
            metrics = lake.delete(table, predicate)
            deleted[table] = int(metrics.get("num_deleted_rows", present))
        else:
            deleted[table] = 0
        # vacuum even when nothing matched now: older versions may still hold the user
        lake.vacuum(table, retention_hours=int(retention_hours))
        if retention_hours <= 0:
            purge_history(lake, table)
    return deleted


# ---------------------------------------------------------------------------------------------- Redis
def forget_in_redis(client: Any, user_id: str, session_ids: set[str], event_ids: set[str]) -> dict[str, int]:
    """Delete the user's keys, session keys, per-event markers and stream entries. {what: count}."""
    from features.online_keys import PREFIX, VERSIONS_KEY, session_key, user_key

    def s(v: Any) -> str:
        return v.decode(errors="replace") if isinstance(v, bytes) else str(v)

    uid = str(user_id)
    doomed: set[str] = set()
    versions = {s(v) for v in client.zrange(VERSIONS_KEY, 0, -1)}
    current = client.get(f"{PREFIX}:current")
    if current:
        versions.add(s(current))
    doomed.update(user_key(v, uid) for v in versions)
    doomed.update(k for k in (s(k) for k in client.scan_iter(match=f"*{glob_escape(uid)}*", count=SCAN_COUNT))
                  if names_user(k, uid))
    stream_entries = 0
    for key in (s(k) for k in client.scan_iter(count=SCAN_COUNT, _type="stream")):
        last = "-"
        while True:
            entries = client.xrange(key, min=last, max="+", count=SCAN_COUNT)
            if not entries:
                break
            mine = []
            for entry_id, fields in entries:
                doc = user_entry({s(k): s(v) for k, v in fields.items()}, uid)
                if doc is not None:
                    mine.append(s(entry_id))
                    if doc.get("session_id"):
                        session_ids.add(str(doc["session_id"]))
                    if doc.get("event_id"):
                        event_ids.add(str(doc["event_id"]))
            if mine:
                stream_entries += int(client.xdel(key, *mine))
            last = "(" + s(entries[-1][0])
    user_keys = sum(int(client.unlink(*batch)) for batch in _chunks(sorted(doomed)))
    sessions = sum(int(client.unlink(*batch)) for batch in _chunks(sorted(session_key(x) for x in session_ids)))
    from streaming.intake import intake_key
    from streaming.job import MARKER_PREFIX, session_owner_key

    # a session's owner key names the user; the intake's idempotency keys name the user's event ids
    sessions += sum(int(client.unlink(*batch)) for batch in _chunks(sorted(session_owner_key(x) for x in session_ids)))
    markers = sum(int(client.unlink(*batch)) for batch in _chunks(sorted(
        [f"{MARKER_PREFIX}:{e}" for e in event_ids] + [intake_key(e) for e in event_ids])))
    return {"redis_user_keys": user_keys, "redis_session_keys": sessions, "redis_event_markers": markers,
            "redis_stream_entries": stream_entries}


def _chunks(keys: list[str], size: int = 500) -> Iterable[list[str]]:
    for start in range(0, len(keys), size):
        yield keys[start:start + size]


# ---------------------------------------------------------------------------------------------- the request
class ForgetIncomplete(RuntimeError):
    """A forget request failed after it started deleting; its audit row says what was done and what to do."""


def _pending(settings: Settings, user_id: str) -> dict[str, Any]:
    """What still holds the user after the deletes: model bundles trained before the request, other files."""
    models = model_files_with_user(settings.home, user_id)
    pending: dict[str, Any] = {}
    if models:
        pending.update({"model_bundles": models,
                        "action": "retrain (the next model excludes the user; it also overwrites the training "
                                  "intermediates in DAGSTER_HOME/storage), then delete the old model versions listed"})
    lake_dir = [Path(settings.lake_uri)] if "://" not in settings.lake_uri else []
    others = [f for f in files_naming_user(settings.home, user_id, skip=lake_dir)
              if not any(f.startswith(m + "/") for m in models)]
    if others:
        pending.update({"other_files": others,
                        "other_files_note": "operational records naming the user (Dagster event log metadata, "
                                            "data docs, reports): they expire with those tools' retention"})
    return pending


def forget_user(settings: Settings, user_id: str, requested_by: str, reason: str,
                retention_hours: float = PURGE, redis_client: Any = None) -> dict[str, Any]:
    """Forget one user everywhere (see the module doc); returns the audit row written.

    Everything that can fail before a write is done first (listing the lake's tables and their schemas,
    reaching Redis, finding the user's sessions): a failure there raises and changes nothing. Once the
    exclusion row is written, the request always ends with its audit row: complete, or `pending.status`
    = `incomplete` with the step that failed, the error and the counts deleted so far, and then raises
    ForgetIncomplete. Every step is idempotent, so re-running the same request finishes it.
    """
    if not str(user_id or "").strip():
        raise ValueError("forget_user needs the user id to forget (--user)")
    if not str(requested_by or "").strip() or not str(reason or "").strip():
        raise ValueError("forget_user needs who asked (--by) and why (--reason): both go to the privacy audit log")
    if retention_hours < 0:
        raise ValueError(f"retention_hours must be >= 0 (0 = purge now), got {retention_hours}")
    user_id = str(user_id)
    started = int(time.time() * 1000)
    request_id = uuid.uuid4().hex
    lake = DeltaLake(settings.lake_uri)
    uhash = user_hash(privacy_key(settings), user_id)
    # 0. preflight: nothing written yet
    tables = user_tables(lake)
    sessions, events = _user_sessions_and_events(lake, tables, user_id)
    if redis_client is None:
        redis_client = make_redis_client(redis_url_from_env(settings), socket_timeout=30)
    redis_client.ping()
    deleted: dict[str, int] = {}
    lake_deleted: dict[str, int] = {}
    step = "exclusion list"
    try:
        # 1. exclusion list first, so nothing re-ingests the user while we delete
        lake.write(FORGOTTEN_USERS, pd.DataFrame([{"user_hash": uhash, "forgotten_at_ms": started,
                                                   "request_id": request_id}]), mode="append", schema=FORGOTTEN_SCHEMA)
        # 2. Redis (also collects sessions only seen in the streams)
        step = "redis"
        deleted.update(forget_in_redis(redis_client, user_id, sessions, events))
        # 3 + 4. Delta rows, then vacuum by the policy
        step = "delta"
        forget_in_lake(lake, user_id, retention_hours, tables=tables, into=lake_deleted)
        step = "pending"
        pending = _pending(settings, user_id)
    except Exception as exc:
        deleted.update({f"delta.{t}": n for t, n in lake_deleted.items()})
        pending = {"status": "incomplete", "failed_step": step, "error": f"{type(exc).__name__}: {exc}"[:2000],
                   "action": "fix the cause, then re-run the same forget request: every step is idempotent"}
        row = audit_row(request_id, uhash, str(requested_by), str(reason), started, int(time.time() * 1000),
                        retention_hours, deleted, pending)
        lake.write(PRIVACY_AUDIT, pd.DataFrame([row]), mode="append", schema=AUDIT_SCHEMA)
        raise ForgetIncomplete(f"forget request {request_id} failed at the {step} step ({type(exc).__name__}: {exc}); "
                               f"its audit row records what was deleted so far. Fix the cause and run the same "
                               f"`kairos forget` again: every step is idempotent.") from exc
    deleted.update({f"delta.{t}": n for t, n in lake_deleted.items()})
    # 5. audit, with what still holds the user
    row = audit_row(request_id, uhash, str(requested_by), str(reason), started, int(time.time() * 1000),
                    retention_hours, deleted, pending)
    lake.write(PRIVACY_AUDIT, pd.DataFrame([row]), mode="append", schema=AUDIT_SCHEMA)
    log.info("forgot user %s… for %s: %d rows/keys/entries deleted (%s)", uhash[:12], requested_by,
             row["total_deleted"], "purged now" if retention_hours <= 0 else f"time travel kept {retention_hours} h")
    return row


def was_forgotten(settings: Settings, user_id: str) -> list[dict[str, Any]]:
    """The audit entries for a user id (an auditor's check: hash the id with the key, look it up)."""
    lake = DeltaLake(settings.lake_uri)
    if not lake.exists(PRIVACY_AUDIT):
        return []
    audit = lake.read(PRIVACY_AUDIT)
    return audit[audit["user_hash"] == user_hash(privacy_key(settings), str(user_id))].to_dict("records")
