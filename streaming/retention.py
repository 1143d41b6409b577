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

import os
from dataclasses import dataclass
from typing import Any

import redis

DEFAULT_MAX_BACKLOG = int(os.environ.get("KAIROS_STREAM_MAX_BACKLOG", "1000000"))


def as_text(v: Any) -> Any:
    """A Redis reply as text whatever the client's decode_responses setting."""
    return v.decode() if isinstance(v, bytes) else v



def ensure_group(client: Any, stream: str, group: str) -> None:
    """Create the consumer group at the stream's beginning (every entry already there is owed to it);
    a group that exists is left where it is."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


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


def trim_processed(client: Any, stream: str) -> int:
    """Delete the entries every consumer group is done with; returns how many were removed."""
    minid = safe_trim_id(group_positions(client, stream))
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
    out: dict[str, Any] = {"stream": stream, "length": 0, "groups": {}}
    try:
        out["length"] = int(client.xlen(stream))
    except redis.ResponseError:
        return out
    now = server_time_ms(client)
    for g in group_positions(client, stream):
        first = client.xrange(stream, min="(" + g.last_delivered, max="+", count=1) if g.last_delivered != "0-0" \
            else client.xrange(stream, min="-", max="+", count=1)
        oldest_ms = [parse_id(as_text(first[0][0]))[0]] if first else []
        if g.pending and g.oldest_pending:
            oldest_ms.append(parse_id(g.oldest_pending)[0])
        out["groups"][g.name] = {"pending": g.pending, "last_delivered_id": g.last_delivered,
                                 "lag_ms": max(now - min(oldest_ms), 0) if oldest_ms else 0}
    return out


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


__all__ = ["Backpressure", "GroupPosition", "check_backpressure", "group_positions", "next_id", "parse_id",
           "safe_trim_id", "server_time_ms", "stream_lag", "trim_processed", "DEFAULT_MAX_BACKLOG"]
