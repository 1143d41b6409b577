"""Event intake (`POST /v1/events`): validate, then append to the stream exactly once per event_id.

Validation is the batch contract's own rule list read per event (data_contracts.events.check_event),
so the stream never accepts what silver would quarantine; a refused event is answered with the field
and the rule, and kept in the quarantine stream with its reason (landed in Delta by the lander).

Idempotency: `event_id` is the key. One Lua script per request, atomic in Redis, checks
`kairos:intake:{event_id}` for every event and XADDs only those never seen, recording the stream id
under that key (TTL INTAKE_KEY_TTL_S); an id seen before answers the stream id of its first write.
So a producer that retries a batch after a timeout never duplicates an entry, and the script runs
whole or not at all: after a lost reply, `intake` asks Redis which of the batch's keys exist and
answers 200 if the write happened, `IntakeUnavailable(written=False)` (HTTP 503, "nothing was
written") if it did not, and `written=None` only when Redis cannot be asked (the retry is safe).

Durability: the embedded Redis runs with appendfsync always (orchestration/services.py), so the
script's effects are on disk before the answer leaves Redis: acknowledged means durable.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any

import redis

from data_contracts.event_rules import DEFAULT_MAX_FUTURE_SKEW_MS, check_event, event_rules
from streaming.retention import DEFAULT_MAX_BACKLOG, as_text, check_backpressure

INTAKE_KEY_PREFIX = "kairos:intake"
INTAKE_KEY_TTL_S = 7 * 86400  # a producer retry older than a week is a new event
QUARANTINE_STREAM = "kairos:quarantine"  # refused events with the reason (intake and job); landed in Delta
DEAD_LETTER_STREAM = "kairos:deadletter"  # valid events the job's fold still failed on (a bug), with the error
QUARANTINE_MAXLEN = 100_000  # a memory guard only: the lander moves entries to Delta long before
COUNTS_KEY = "kairos:stream:counts"

# KEYS[1] = stream; ARGV[1] = key prefix, ARGV[2] = ttl s, then (event_id, payload) pairs.
# Returns, per event, {1, id} (written now) or {0, id} (written by an earlier request).
_APPEND_ONCE = """
local out = {}
local prefix, ttl = ARGV[1], tonumber(ARGV[2])
for i = 3, #ARGV, 2 do
  local key = prefix .. ':' .. ARGV[i]
  local seen = redis.call('GET', key)
  if seen then
    out[#out + 1] = {0, seen}
  else
    local id = redis.call('XADD', KEYS[1], '*', 'event', ARGV[i + 1])
    redis.call('SET', key, id, 'EX', ttl)
    out[#out + 1] = {1, id}
  end
end
return out
"""


class IntakeUnavailable(RuntimeError):
    """Redis failed during the write. `written`: False = nothing of the batch was written (retry it),
    True never raised (that is a success), None = Redis could not be asked (retrying is safe anyway:
    event_id is the idempotency key)."""

    def __init__(self, cause: BaseException, written: bool | None) -> None:
        self.cause, self.written = cause, written
        what = ("nothing was written; retry the batch" if written is False else
                "could not confirm whether the batch was written; retry it (event_id is the idempotency key: "
                "a retry never duplicates)")
        super().__init__(f"{type(cause).__name__}: {cause}; {what}")


def intake_key(event_id: str) -> str:
    return f"{INTAKE_KEY_PREFIX}:{event_id}"


def _payload(event: dict) -> str:
    return json.dumps(event, separators=(",", ":"), default=str, allow_nan=False)


def append_once(client: Any, stream: str, events: list[dict]) -> list[tuple[str, bool]]:
    """XADD each event whose event_id was never written; (stream id, written now) per event, in order."""
    if not events:
        return []
    args: list[str] = [INTAKE_KEY_PREFIX, str(INTAKE_KEY_TTL_S)]
    for event in events:
        args += [str(event["event_id"]), _payload(event)]
    reply = client.eval(_APPEND_ONCE, 1, stream, *args)
    return [(as_text(sid), bool(int(flag))) for flag, sid in reply]


def _confirm(client: Any, events: list[dict]) -> list[str | None]:
    """After a failed reply: the stream id recorded for each event id (None where nothing was written)."""
    return [as_text(v) if v is not None else None
            for v in client.mget([intake_key(str(e["event_id"])) for e in events])]


def _quarantine(client: Any, refused: list[tuple[Any, str]], now_ms: int) -> None:
    pipe = client.pipeline(transaction=False)
    for event, reason in refused:
        try:
            raw = json.dumps(event, default=str)
        except (TypeError, ValueError):
            raw = repr(event)
        pipe.xadd(QUARANTINE_STREAM, {"event": raw, "reason": reason, "stream_id": "", "consumer": "intake",
                                      "ts_ms": str(now_ms)}, maxlen=QUARANTINE_MAXLEN, approximate=True)
    pipe.hincrby(COUNTS_KEY, "intake_quarantined", len(refused))
    pipe.execute()


def _has_nonfinite(value: Any) -> bool:
    """NaN/Infinity anywhere in the event (JSON has neither; Python's parser lets them through)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_nonfinite(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nonfinite(v) for v in value)
    return False


def intake(client: Any, events: list[Any], now_ms: int | None = None, stream: str = "kairos:events",
           max_future_skew_ms: int = DEFAULT_MAX_FUTURE_SKEW_MS, max_backlog: int = DEFAULT_MAX_BACKLOG) -> dict[str, Any]:
    """Validate each event; write the valid ones once each (by event_id), quarantine the others with reason.

    Raises streaming.retention.Backpressure (nothing written) when the backlog plus this batch would pass
    `max_backlog` (HTTP 429), IntakeUnavailable when Redis failed and the write is not confirmed (503)."""
    now_ms = int(time.time() * 1000) if now_ms is None else int(now_ms)
    check_backpressure(client, stream, len(events), max_backlog)
    rules = event_rules(now_ms, max_future_skew_ms)
    good: list[dict] = []
    errors: list[dict[str, Any]] = []
    refused: list[tuple[Any, str]] = []
    for index, event in enumerate(events):
        found = check_event(event, rules=rules)
        if found is None and _has_nonfinite(event):
            found = ("event", "event_is_finite: NaN or Infinity in a field (JSON has neither)")
        if found is None:
            good.append(event)
            continue
        field, reason = found
        event_id = event.get("event_id") if isinstance(event, dict) else None
        errors.append({"index": index, "event_id": event_id if isinstance(event_id, str) else None,
                       "field": field, "reason": reason})
        refused.append((event, reason))
    if refused:
        _quarantine(client, refused, now_ms)
    try:
        written = append_once(client, stream, good)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        try:
            ids = _confirm(client, good)
        except redis.RedisError:
            raise IntakeUnavailable(exc, written=None) from exc
        if any(i is None for i in ids):  # the script is atomic: none of it ran
            raise IntakeUnavailable(exc, written=False) from exc
        written = [(i, True) for i in ids if i is not None]  # it ran (no None, above); only its answer was lost
    duplicates = [e["event_id"] for e, (_, new) in zip(good, written) if not new]
    return {"accepted": [e["event_id"] for e in good], "stream_ids": [sid for sid, _ in written], "errors": errors,
            "duplicates": duplicates,
            "counts": {"received": len(events), "accepted": len(good), "quarantined": len(errors),
                       "duplicates": len(duplicates)}}


__all__ = ["INTAKE_KEY_PREFIX", "INTAKE_KEY_TTL_S", "IntakeUnavailable", "append_once", "intake", "intake_key"]
