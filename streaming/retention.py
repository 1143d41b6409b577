"""Stream retention, lag and backpressure for `kairos:events`.

Policy (DESIGN invariant 3, "nothing lost"): the stream is never capped by MAXLEN, which
would drop the oldest entries whether or not anyone processed them. Instead:

* every reader of the stream is a consumer group (the sessionizer reads through one; the
  bronze dual writer records how far it has landed as its group's last-delivered id);
* `trim_processed` removes exactly the entries every group is done with (XTRIM MINID at the
  oldest entry some group still needs: its oldest pending entry, else the one after its
  last-delivered id), so after a trim the stream length *is* the unprocessed backlog;
* producers that would push the backlog past `max_backlog` get an explicit `Backpressure`
  (HTTP 429 with Retry-After from `POST /v1/events`), never a silent drop;
* `stream_lag` reports, per group, pending entries and the age of the oldest entry it has
  not finished (the consumer lag metric, the stream->table lag for bronze).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

import redis

log = logging.getLogger("kairos.streaming.retention")

GROUPS_KEY_PREFIX = "kairos:stream:groups"  # SET of the consumer groups that ever read a stream
# default only: the server passes its KAIROS_STREAM_MAX_BACKLOG (serving/settings.py) as intake(max_backlog=)
DEFAULT_MAX_BACKLOG = 1_000_000
STREAM_LAG_ALERT_MS = 60_000      # a group's oldest unfinished entry older than this: alert
STREAM_LAG_ALERT_PENDING = 10_000  # or this many delivered-but-unacknowledged entries


def as_text(v: Any) -> Any:
    """A Redis reply as text whatever the client's decode_responses setting."""
    return v.decode() if isinstance(v, bytes) else v



def groups_key(stream: str) -> str:
    return f"{GROUPS_KEY_PREFIX}:{stream}"


def ensure_group(client: Any, stream: str, group: str) -> bool:
    """Create the consumer group at the stream's beginning (every entry already there is owed to it);
    a group that exists is left where it is. The group is registered as a reader of the stream, so
    retention never trims while it is missing (a wiped Redis, a deleted group). True if it was created."""
    client.sadd(groups_key(stream), group)
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
        return True
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
        return False


def registered_groups(client: Any, stream: str) -> set[str]:
    """Every consumer group that ever registered as a reader of `stream` (ensure_group)."""
    return {as_text(g) for g in client.smembers(groups_key(stream))}


def missing_groups(client: Any, stream: str, required: Iterable[str] = (),
                   positions: "list[GroupPosition] | None" = None) -> list[str]:
    """Registered (or `required`) readers of the stream whose consumer group does not exist now."""
    present = {g.name for g in (group_positions(client, stream) if positions is None else positions)}
    return sorted((registered_groups(client, stream) | set(required)) - present)


def parse_id(stream_id: str) -> tuple[int, int]:
    """'1767225600000-3' -> (1767225600000, 3), so ids compare as numbers, not strings."""
    ms, _, seq = str(stream_id).partition("-")
    return int(ms), int(seq or 0)


def next_id(stream_id: str) -> str:
    """The smallest id strictly after `stream_id` (XTRIM MINID keeps ids >= it)."""
    ms, seq = parse_id(stream_id)
    return f"{ms}-{seq + 1}"


@dataclass(frozen=True)
class GroupPosition:
    """How far one consumer group is: what it has delivered and what it still holds unacknowledged."""

    name: str
    last_delivered: str
    pending: int
    oldest_pending: str | None

    def needs_from(self) -> str:
        """The oldest stream id this group still needs (everything below it is done)."""
        if self.pending and self.oldest_pending:
            return self.oldest_pending
        return next_id(self.last_delivered)


def safe_trim_id(groups: list[GroupPosition]) -> str | None:
    """The MINID below which every group is done; None when no group reads the stream (then never trim)."""
    if not groups:
        return None
    return min((g.needs_from() for g in groups), key=parse_id)


def group_positions(client: Any, stream: str) -> list[GroupPosition]:
    """Every consumer group of the stream with its last-delivered id and oldest pending entry."""
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no such stream yet
        return []
    out = []
    for g in groups:
        name = as_text(g.get("name"))
        pending = int(g.get("pending", 0))
        oldest = None
        if pending:
            summary = client.xpending(stream, name)
            oldest = as_text(summary.get("min")) if summary else None
        out.append(GroupPosition(name, as_text(g.get("last-delivered-id") or "0-0"), pending, oldest))
    return out


def trim_processed(client: Any, stream: str, required: Iterable[str] = ()) -> int:
    """Delete the entries every consumer group is done with; returns how many were removed.

    Never trims while a registered or `required` reader's group is missing: its position is unknown,
    so everything left is owed to it (it is re-created at the stream's beginning and catches up)."""
    positions = group_positions(client, stream)
    missing = missing_groups(client, stream, required, positions)
    if missing:
        log.error("ALERT consumer group(s) %s missing on %s: retention paused (nothing is trimmed) until they are "
                  "re-created; restart `kairos stream` if this persists", ", ".join(missing), stream)
        return 0
    minid = safe_trim_id(positions)
    if minid is None:
        return 0
    return int(client.xtrim(stream, minid=minid, approximate=False))


def server_time_ms(client: Any) -> int:
    """Redis' clock (stream ids are minted from it, so ages are measured on the same clock)."""
    sec, usec = client.time()
    return int(sec) * 1000 + int(usec) // 1000


def stream_lag(client: Any, stream: str) -> dict[str, Any]:
    """Length (= backlog after a trim) and, per group, pending entries and the age in ms of the oldest
    entry it has not finished (0 when it is caught up)."""
    out: dict[str, Any] = {"stream": stream, "length": 0, "groups": {}, "missing_groups": []}
    try:
        out["length"] = int(client.xlen(stream))
    except redis.ResponseError:
        return out
    now = server_time_ms(client)
    positions = group_positions(client, stream)
    out["missing_groups"] = missing_groups(client, stream, positions=positions)
    for g in positions:
        first = client.xrange(stream, min="(" + g.last_delivered, max="+", count=1) if g.last_delivered != "0-0" \
            else client.xrange(stream, min="-", max="+", count=1)
        oldest_ms = [parse_id(as_text(first[0][0]))[0]] if first else []
        if g.pending and g.oldest_pending:
            oldest_ms.append(parse_id(g.oldest_pending)[0])
        out["groups"][g.name] = {"pending": g.pending, "last_delivered_id": g.last_delivered,
                                 "lag_ms": max(now - min(oldest_ms), 0) if oldest_ms else 0}
    return out


def lag_decision(lag: dict[str, Any], group: str, max_lag_ms: int = STREAM_LAG_ALERT_MS,
                 max_pending: int = STREAM_LAG_ALERT_PENDING) -> tuple[bool, str]:
    """Whether the consumer lag calls for an alert (and a draining run), and why. Every group counts (the
    sessionizer: session freshness; kairos-bronze: stream -> table); `group` must exist once events arrive."""
    if group not in lag["groups"]:
        if lag["length"]:
            return True, f"{lag['length']} entries in {lag['stream']} and no consumer group {group}: start `kairos stream`"
        return False, f"{lag['stream']} is empty and has no consumer group yet"
    missing = lag.get("missing_groups") or []
    if missing:  # a registered reader lost its group (Redis wiped or restored without it): retention is paused
        return True, (f"consumer group(s) {', '.join(missing)} missing on {lag['stream']} (registered readers): "
                      f"retention is paused until `kairos stream` re-creates them; check Redis persistence")
    name, g = max(lag["groups"].items(), key=lambda kv: (kv[1]["lag_ms"], kv[1]["pending"]))
    over = [n for n, x in lag["groups"].items() if x["lag_ms"] > max_lag_ms or x["pending"] > max_pending]
    if over:
        name, g = over[0], lag["groups"][over[0]]
        return True, (f"group {name}: consumer lag {g['lag_ms']} ms (threshold {max_lag_ms}), {g['pending']} pending "
                      f"(threshold {max_pending}), stream length {lag['length']}")
    return False, f"consumer lag {g['lag_ms']} ms (worst group {name}) and pending are within thresholds"


class Backpressure(RuntimeError):
    """The unprocessed backlog is over its limit: the producer must retry later (nothing was accepted)."""

    def __init__(self, backlog: int, limit: int, retry_after_s: int) -> None:
        self.backlog, self.limit, self.retry_after_s = backlog, limit, retry_after_s
        super().__init__(f"stream backlog {backlog} entries would exceed the limit {limit}: the streaming job is "
                         f"behind (check `kairos stream` and the stream_lag_sensor); retry in {retry_after_s} s")


def check_backpressure(client: Any, stream: str, incoming: int, max_backlog: int = DEFAULT_MAX_BACKLOG,
                       retry_after_s: int = 1) -> int:
    """Raise Backpressure if accepting `incoming` more entries would pass `max_backlog`; else the backlog.

    XLEN is the backlog because the job trims processed entries every second (`trim_processed`);
    between trims it over-counts by at most a second of traffic, which errs on the safe side."""
    backlog = int(client.xlen(stream))
    if backlog + incoming > max_backlog:
        raise Backpressure(backlog, max_backlog, retry_after_s)
    return backlog


__all__ = ["Backpressure", "GroupPosition", "check_backpressure", "ensure_group", "group_positions", "lag_decision",
           "missing_groups", "STREAM_LAG_ALERT_MS", "STREAM_LAG_ALERT_PENDING",
           "next_id", "parse_id", "registered_groups",
           "safe_trim_id", "server_time_ms", "stream_lag", "trim_processed", "DEFAULT_MAX_BACKLOG"]
