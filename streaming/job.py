"""The near-line streaming job: Redis Stream of events -> session state keys in Redis.

    producers --XADD--> kairos:events --XREADGROUP (group kairos-sessionizer)--> this job
        valid event   -> features.functions.update_session -> kairos:session:{session_id}
        invalid event -> kairos:quarantine (with a reason), acknowledged, never silently dropped

Exactly-once effect on the session keys (DESIGN invariant 3): a batch's events are
applied in one optimistic transaction (one per user when another consumer conflicts).
We WATCH the session keys, the user-level keys and a per-event marker
`kairos:applied:{event_id}`, read them all (one MGET), fold the events whose marker is
absent with the shared update_session, in stream order, and MULTI/EXEC the new states
together with the markers and the XACK of the batch's entries. A WatchError (a
concurrent writer) retries. The acknowledgement commits with the update, never before
it: a consumer that dies before EXEC leaves its entries pending and unapplied, and
whoever reclaims them (XAUTOCLAIM, or the same consumer re-reading its pending list on
restart) applies them once; anything already applied is found by its marker and
skipped. A duplicate event id (producer retry) is skipped the same way. Durable
counters in `kairos:stream:counts` (applied, duplicates, quarantined) move in the same
transactions, so entries added = applied + duplicates + quarantined + dead_lettered + pending at any time.

The same transaction folds the events into a user-level key `kairos:user_recent_cats:{user}`
(recent categories with decay, last items, counters; TTL 7 days), with the same shared function.

A session belongs to the first user whose event is applied to it: `kairos:session_owner:{session_id}` is watched
and read with the session key, decided on by `plan_events`, and written with the session key (same TTL) in the
same EXEC; another user's event naming the session is quarantined in that EXEC
(`session_id_owned_by_another_user`). So consumers racing over a new session id never both claim it.

Retention and backpressure live in streaming/retention.py (trim only what every group finished,
429 for producers past the backlog limit); the bronze dual write in streaming/bronze.py.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Sequence

import redis

from data_contracts.event_rules import check_event
from features.functions import new_session_state, update_session
from features.online import OnlineStore
from features.online_codec import decode_session
from features.online_keys import SESSION_TTL_S, session_key, session_owner_key
from ground.settings import Settings, redact_url, redis_client, redis_url_from_env
from streaming.intake import COUNTS_KEY, DEAD_LETTER_STREAM, QUARANTINE_MAXLEN, QUARANTINE_STREAM, intake  # noqa: F401 - re-exported
from streaming.options import StreamJobOptions, parse_args
from streaming.retention import as_text as _s, ensure_group, parse_id, stream_lag, trim_processed

log = logging.getLogger("kairos.streaming")

STREAM = "kairos:events"
GROUP = "kairos-sessionizer"
MARKER_PREFIX = "kairos:applied"
MARKER_TTL_S = 86400
USER_RECENT_PREFIX = "kairos:user_recent_cats"
USER_RECENT_TTL_S = 7 * 86400
ITEM_TABLE_RECHECK_S = 5.0
CATEGORY_MEMO_ITEMS = 100_000  # last categories seen, for batches while Redis is unreachable
Entry = tuple[str, str, dict]  # a valid stream entry: (stream id, raw JSON, event)


def marker_key(event_id: str) -> str:
    return f"{MARKER_PREFIX}:{event_id}"


def user_recent_key(user_id: str) -> str:
    """The user-level fold of recent events (categories with decay), across the user's sessions."""
    return f"{USER_RECENT_PREFIX}:{user_id}"




def publish(client: Any, events: Iterable[dict], stream: str = STREAM) -> list[str]:
    """XADD each event (field "event" = its JSON) in one pipeline; returns the stream ids.

    No MAXLEN: trimming by length would drop entries nobody processed. The job trims what every
    consumer group finished (streaming/retention.py); producers going through `intake` are refused
    with Backpressure when the backlog is over its limit."""
    pipe = client.pipeline(transaction=False)
    n = 0
    for event in events:
        pipe.xadd(stream, {"event": json.dumps(event, separators=(",", ":"), default=str)})
        n += 1
    if not n:
        return []
    return [_s(i) for i in pipe.execute()]


def read_entry(fields: Mapping[str, str]) -> tuple[str, dict | None, str | None]:
    """(raw, event, None) for an entry the fold may take, else (raw, None, reason). Whatever a producer writing
    to the stream directly put there (not JSON, nested past the parser's depth, something the contract check
    chokes on) becomes a reason, never an exception: an exception here would crash the job on the same pending
    entry after every restart."""
    raw = fields.get("event", "")
    try:
        event = json.loads(raw)
    except (TypeError, ValueError, RecursionError) as exc:
        return raw or json.dumps(fields), None, f"event is not valid JSON ({type(exc).__name__})"
    try:
        reason = validate_event(event)
    except Exception as exc:  # noqa: BLE001 - poison input, not a reason to stop the job
        reason = f"event could not be checked against the contract: {type(exc).__name__}: {exc}"[:2000]
    return (raw, None, reason) if reason else (raw, event, None)


APPLY, DUPLICATE, REFUSED = "apply", "duplicate", "refused"


def plan_events(events: Sequence[dict], already_applied: Sequence[bool],
                owners: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """Each event's outcome, in stream order, and the owner of each session afterwards.

    DUPLICATE: its id was applied before (`already_applied`, its marker) or earlier in this batch. REFUSED: its
    session belongs to another user (`owners`, or claimed earlier in this batch). APPLY otherwise, and an
    unowned session is claimed by the first user in stream order whose event applies to it. Pure: `_apply` runs
    it on what it read under WATCH, so a claim is decided and written in one transaction."""
    owner_of = dict(owners)
    seen: set[str] = set()
    out: list[str] = []
    for event, done in zip(events, already_applied):
        if done or event["event_id"] in seen:
            out.append(DUPLICATE)
        elif owner_of.setdefault(event["session_id"], event["user_id"]) != event["user_id"]:
            out.append(REFUSED)
        else:
            seen.add(event["event_id"])
            out.append(APPLY)
    return out, owner_of


def validate_event(event: Any, now_ms: int | None = None) -> str | None:
    """None if the event can be applied to a session, else the reason it cannot: the batch contract's rules,
    per event (data_contracts.events.check_event), so the job and silver agree on what an event is."""
    found = check_event(event, now_ms=now_ms)
    return None if found is None else found[1]


class SessionStreamProcessor:
    """One consumer of the sessionizer group. Safe to run several (different consumer names)."""

    def __init__(self, client: Any, consumer_name: str, stream: str = STREAM, group: str = GROUP,
                 session_ttl_s: int = SESSION_TTL_S, user_ttl_s: int = USER_RECENT_TTL_S) -> None:
        self.client = client
        self.consumer = consumer_name
        self.stream = stream
        self.group = group
        self.session_ttl_s = session_ttl_s
        self.user_ttl_s = user_ttl_s
        self.store = OnlineStore(client)
        self._categories: dict[str, str | None] = {}
        self._categories_version: str | None = None
        self._categories_checked = 0.0
        self.required_groups: tuple[str, ...] = (group,)  # readers retention waits for (run_job adds bronze)
        self.stats = {"applied": 0, "duplicates": 0, "quarantined": 0, "dead_lettered": 0, "retries": 0, "batches": 0}

    # ------------------------------------------------------------------ setup
    def ensure_group(self) -> None:
        ensure_group(self.client, self.stream, self.group)

    # ------------------------------------------------------------------ item categories
    def _category_map(self, item_ids: Iterable[str | None]) -> dict[str, str | None]:
        """Categories of this batch's items only (the store's row cache + one HMGET for the rest)."""
        now = time.monotonic()
        if now - self._categories_checked >= ITEM_TABLE_RECHECK_S or self._categories_version is None:
            self._categories_checked = now
            try:
                self._categories_version = self.store.current_version() or self._categories_version
            except redis.RedisError as exc:  # keep the last version; the next batch retries
                log.warning("could not read the live feature version: %s", exc)
        try:
            got = self.store.categories(self._categories_version, (i for i in item_ids if i))
        except redis.RedisError as exc:  # the last categories seen; the next batch retries
            log.warning("could not read item categories: %s", exc)
            return self._categories
        self._categories.update(got)
        while len(self._categories) > CATEGORY_MEMO_ITEMS:
            self._categories.pop(next(iter(self._categories)))
        return got

    # ------------------------------------------------------------------ processing
    def process_once(self, count: int = 100, block_ms: int = 100) -> int:
        """Read up to `count` new entries (blocking up to block_ms); returns how many were applied."""
        resp = self.client.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=count, block=block_ms)
        entries: list[tuple[str, dict]] = []
        for _stream, msgs in resp or []:
            entries.extend(msgs)
        return self._handle(entries)

    def process_pending(self, count: int = 100) -> int:
        """Re-process entries delivered to this consumer but never acknowledged (after a restart)."""
        total = 0
        while True:
            resp = self.client.xreadgroup(self.group, self.consumer, {self.stream: "0"}, count=count)
            entries = [m for _s_, msgs in resp or [] for m in msgs]
            if not entries:
                return total
            total += self._handle(entries)

    def reclaim(self, min_idle_ms: int = 60_000, count: int = 100) -> int:
        """Take over entries another consumer read but never acked (it crashed) and apply them."""
        total = 0
        start = "0-0"
        while True:
            res = self.client.xautoclaim(self.stream, self.group, self.consumer, min_idle_ms, start_id=start, count=count)
            next_id, msgs = _s(res[0]), res[1]
            if msgs:
                total += self._handle(msgs)
            if not next_id or next_id == "0-0":
                return total
            start = next_id

    def _handle(self, entries: list[tuple[Any, Any]]) -> int:
        if not entries:
            return 0
        self.stats["batches"] += 1
        valid: "OrderedDict[str, list[Entry]]" = OrderedDict()  # by user, in stream order
        bad: list[tuple[str, str, str]] = []  # (stream id, raw, reason)
        for entry_id, fields in entries:
            entry_id = _s(entry_id)
            if fields is None:  # entry deleted from the stream while pending
                bad.append((entry_id, "", "entry deleted from the stream before processing"))
                continue
            raw, event, reason = read_entry({_s(k): _s(v) for k, v in fields.items()})
            if event is None:
                bad.append((entry_id, raw, reason or "event could not be read"))
                continue
            valid.setdefault(event["user_id"], []).append((entry_id, raw, event))
        if bad:
            self._quarantine(bad)
        applied = 0
        if valid:
            categories = self._category_map(e.get("item_id") for evs in valid.values() for _, _, e in evs)
            applied += self._apply_or_dead_letter(valid, categories)
        return applied

    def _apply_or_dead_letter(self, groups: "OrderedDict[str, list[Entry]]",
                              categories: dict[str, str | None]) -> int:
        """`_apply`, and when it raises something that is not Redis' fault (a valid event the fold still cannot
        take: a bug), narrow it down, one user then one event at a time in stream order, and dead-letter only the
        event that fails, with the error. The job never crash-loops on an event; the rest of the batch applies."""
        try:
            return self._apply(groups, categories)
        except redis.RedisError:
            raise
        except Exception as exc:  # noqa: BLE001 - isolate the poison event below
            users = list(groups)
            if len(users) > 1:
                return sum(self._apply_or_dead_letter(OrderedDict([(u, groups[u])]), categories) for u in users)
            user, items = users[0], groups[users[0]]
            if len(items) > 1:
                return sum(self._apply_or_dead_letter(OrderedDict([(user, [item])]), categories) for item in items)
            self._dead_letter(items[0][0], items[0][2], exc)
            return 0

    def _dead_letter(self, entry_id: str, event: dict, exc: BaseException) -> None:
        """Move one entry to the dead-letter stream with the error, acknowledged and counted in one transaction."""
        reason = f"{type(exc).__name__}: {exc}"[:2000]
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(DEAD_LETTER_STREAM, {"event": json.dumps(event, default=str), "reason": reason, "stream_id": entry_id,
                                       "consumer": self.consumer, "ts_ms": str(int(time.time() * 1000))},
                  maxlen=QUARANTINE_MAXLEN, approximate=True)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.hincrby(COUNTS_KEY, "dead_lettered", 1)
        pipe.execute()
        self.stats["dead_lettered"] += 1
        log.error("dead-lettered stream entry %s (event %s): %s", entry_id, event.get("event_id"), reason)

    def _quarantine(self, bad: list[tuple[str, str, str]]) -> None:
        """Move refused entries to the quarantine stream with their reasons, acknowledged and counted at once."""
        pipe = self.client.pipeline(transaction=True)
        self._queue_quarantine(pipe, bad)
        pipe.xack(self.stream, self.group, *[b[0] for b in bad])
        pipe.execute()
        self._quarantined(bad)

    def _queue_quarantine(self, pipe: Any, bad: list[tuple[str, str, str]]) -> None:
        """Queue the quarantine writes and their count on `pipe` (the caller acknowledges the entries)."""
        for entry_id, raw, reason in bad:
            pipe.xadd(QUARANTINE_STREAM, {"event": raw, "reason": reason, "stream_id": entry_id,
                                          "consumer": self.consumer, "ts_ms": str(int(time.time() * 1000))},
                      maxlen=QUARANTINE_MAXLEN, approximate=True)
        pipe.hincrby(COUNTS_KEY, "quarantined", len(bad))

    def _quarantined(self, bad: list[tuple[str, str, str]]) -> None:
        """After the commit: this consumer's stats and one WARNING line per entry."""
        self.stats["quarantined"] += len(bad)
        for entry_id, _raw, reason in bad:
            log.warning("quarantined stream entry %s: %s", entry_id, reason)

    def _apply(self, groups: "OrderedDict[str, list[Entry]]", categories: dict[str, str | None]) -> int:
        """Apply a batch's valid events in ONE optimistic transaction (WATCH + MGET + MULTI/EXEC: three round
        trips per batch, not per user), folding them in stream order into session and user-level keys.

        The session owners are watched and read in the same transaction and `plan_events` decides there who owns
        each session: a new session is claimed by the EXEC that folds its first event, and an event naming a
        session owned by another user is quarantined in that same EXEC. Two consumers racing over one new session
        cannot both claim it: the loser's WATCH fails and its retry reads the winner.

        Another consumer touching one of these keys meanwhile (WatchError) makes a multi-user batch fall back
        to one transaction per user, each retried until it commits, so contention never repeats a big batch."""
        users = list(groups)
        items = sorted((x for u in users for x in groups[u]), key=lambda x: parse_id(x[0]))
        sids = list(dict.fromkeys(ev["session_id"] for _, _, ev in items))
        ukeys = [user_recent_key(u) for u in users]
        skeys = [session_key(s) for s in sids]
        okeys = [session_owner_key(s) for s in sids]
        markers = [marker_key(ev["event_id"]) for _, _, ev in items]
        n_u, n_s = len(users), len(sids)
        while True:
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*ukeys, *skeys, *okeys, *markers)
                    values = pipe.mget([*ukeys, *skeys, *okeys, *markers])
                    user_states = {u: decode_session(v) or new_session_state() for u, v in zip(users, values[:n_u])}
                    states = {s: decode_session(v) or new_session_state() for s, v in zip(sids, values[n_u:n_u + n_s])}
                    owners = {s: _s(o) for s, o in zip(sids, values[n_u + n_s:n_u + 2 * n_s]) if o is not None}
                    outcomes, owner_of = plan_events([ev for _, _, ev in items],
                                                     [v is not None for v in values[n_u + 2 * n_s:]], owners)
                    touched_s: set[str] = set()
                    touched_u: set[str] = set()
                    to_mark: list[str] = []
                    refused: list[tuple[str, str, str]] = []
                    for (entry_id, raw, ev), mkey, outcome in zip(items, markers, outcomes):
                        if outcome == DUPLICATE:
                            continue  # already applied (redelivery, reclaim or a duplicate id)
                        sid, user = ev["session_id"], ev["user_id"]
                        if outcome == REFUSED:
                            refused.append((entry_id, raw, f"session_id_owned_by_another_user: session {sid!r} belongs "
                                                           f"to another user; a session id must be unique per user"))
                            continue
                        item = ev.get("item_id")
                        category = categories.get(item) if item else None
                        ts = int(ev["timestamp"])
                        states[sid] = update_session(states[sid], ev["event_type"], item, category, ts)
                        user_states[user] = update_session(user_states[user], ev["event_type"], item, category, ts)
                        touched_s.add(sid)
                        touched_u.add(user)
                        to_mark.append(mkey)
                    pipe.multi()
                    for sid in touched_s:  # the owner is (re)written with the session key: they expire together
                        pipe.set(session_key(sid), json.dumps(states[sid], separators=(",", ":")), ex=self.session_ttl_s)
                        pipe.set(session_owner_key(sid), owner_of[sid], ex=self.session_ttl_s)
                    for user in touched_u:
                        pipe.set(user_recent_key(user), json.dumps(user_states[user], separators=(",", ":")),
                                 ex=self.user_ttl_s)
                    for mkey in to_mark:
                        pipe.set(mkey, "1", ex=MARKER_TTL_S)
                    if refused:
                        self._queue_quarantine(pipe, refused)
                    pipe.xack(self.stream, self.group, *[eid for eid, _, _ in items])
                    if to_mark:
                        pipe.hincrby(COUNTS_KEY, "applied", len(to_mark))
                    n_dup = len(items) - len(to_mark) - len(refused)
                    if n_dup:
                        pipe.hincrby(COUNTS_KEY, "duplicates", n_dup)
                    pipe.execute()
                    break
                except redis.WatchError:
                    self.stats["retries"] += 1
                    if n_u > 1:
                        return sum(self._apply(OrderedDict([(u, groups[u])]), categories) for u in users)
        self.stats["applied"] += len(to_mark)
        self.stats["duplicates"] += n_dup
        if refused:
            self._quarantined(refused)
        return len(to_mark)

    # ------------------------------------------------------------------ monitoring
    def lag(self) -> dict[str, Any]:
        """This group's pending entries and lag (age in ms of its oldest unfinished entry), and the stream length."""
        out = stream_lag(self.client, self.stream)
        mine = out["groups"].get(self.group, {})
        return {"pending": int(mine.get("pending", 0)), "lag_ms": int(mine.get("lag_ms", 0)), "length": out["length"]}

    def run_forever(self, stop: threading.Event, count: int = 200, block_ms: int = 100,
                    log_every_s: float = 10.0, reclaim_every_s: float = 30.0, reclaim_idle_ms: int = 60_000,
                    trim_every_s: float = 1.0) -> None:
        """Process until `stop` is set: first this consumer's own pending entries and whatever a dead consumer
        left idle for reclaim_idle_ms, then new entries; trims what every group finished; logs throughput and
        lag periodically; survives Redis hiccups."""
        self.ensure_group()
        try:
            self.process_pending(count)
            self.reclaim(reclaim_idle_ms, count)
        except redis.RedisError as exc:
            log.warning("could not re-process pending entries: %s", exc)
        last_log = last_reclaim = last_trim = time.monotonic()
        applied_since = 0
        backoff = 0.1
        resync = False  # after a Redis error: a batch may be read (pending on us) but never committed
        while not stop.is_set():
            try:
                if resync:  # re-apply our own pending entries now, not after reclaim_idle_ms
                    applied_since += self.process_pending(count)
                    resync = False
                applied_since += self.process_once(count=count, block_ms=block_ms)
                now = time.monotonic()
                if now - last_reclaim >= reclaim_every_s:
                    applied_since += self.reclaim(reclaim_idle_ms, count)
                    last_reclaim = now
                if now - last_trim >= trim_every_s:
                    trim_processed(self.client, self.stream, required=self.required_groups)
                    last_trim = now
                if now - last_log >= log_every_s:
                    lag = stream_lag(self.client, self.stream)
                    groups = ", ".join(f"{n}: lag {g['lag_ms']} ms, {g['pending']} pending"
                                       for n, g in lag["groups"].items())
                    log.info("streaming %s: %.1f events/s applied; stream length %d; %s; totals %s", self.consumer,
                             applied_since / (now - last_log), lag["length"], groups, self.stats)
                    applied_since, last_log = 0, now
                backoff = 0.1
            except redis.RedisError as exc:
                if "NOGROUP" in str(exc):
                    self.ensure_group()
                    log.error("ALERT consumer group %s was missing on %s (Redis lost its data?): re-created at the "
                              "stream's beginning", self.group, self.stream)
                    continue
                resync = True
                log.warning("redis error in the streaming loop (retrying in %.1fs): %s", backoff, exc)
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)


def run_job(client: Any, lake: Any | None, stop: threading.Event, opts: StreamJobOptions,
            redis_url: str | None = None) -> dict[str, Any]:
    """The streaming job until `stop` is set: the sessionizer in this thread and, with a lake, the bronze dual
    writer in its own process (given `redis_url`; else in a thread). Returns both sides' counters."""
    from streaming.bronze import BRONZE_GROUP, BronzeWriter, WriterProcess, refused_landers

    processor = SessionStreamProcessor(client, consumer_name=opts.consumer_name(),
                                       session_ttl_s=opts.session_ttl_s or SESSION_TTL_S,
                                       user_ttl_s=opts.user_ttl_s or USER_RECENT_TTL_S)
    processor.ensure_group()
    writer = thread = child = None
    if lake is not None and opts.bronze:
        processor.required_groups = (GROUP, BRONZE_GROUP)
        writer = BronzeWriter(client, lake, STREAM, window_ms=opts.bronze_window_ms, owner=processor.consumer,
                              lock_ttl_ms=opts.bronze_lock_ttl_ms)
        writer.ensure_group()  # before any trim: from now on nothing bronze has not landed is trimmed
        if redis_url:
            child = WriterProcess(redis_url, lake, STREAM, opts.bronze_window_ms, processor.consumer,
                                  opts.bronze_lock_ttl_ms).start()
        else:
            landers = refused_landers(client, lake, opts.bronze_window_ms, processor.consumer, opts.bronze_lock_ttl_ms)
            thread = threading.Thread(target=writer.run_forever, args=(stop,), kwargs={"companions": landers},
                                      name="kairos-bronze", daemon=True)
            thread.start()
    bronze_stats = None
    try:
        processor.run_forever(stop, count=opts.batch, block_ms=opts.block_ms, reclaim_idle_ms=opts.reclaim_idle_ms,
                              reclaim_every_s=opts.reclaim_every_s)
    finally:
        stop.set()
        if thread is not None and writer is not None:  # the thread runs the writer
            thread.join(timeout=60)
            bronze_stats = dict(writer.stats)
        if child is not None:
            bronze_stats = child.close()
        try:  # a clean stop leaves only unfinished entries in the stream
            trim_processed(client, STREAM, required=processor.required_groups)
        except redis.RedisError as exc:
            log.warning("final trim failed: %s", exc)
    return {"sessions": dict(processor.stats), "bronze": bronze_stats}


def main(argv: list[str] | None = None, opts: StreamJobOptions | None = None) -> int:
    """`kairos stream` / `python -m streaming.job`: run one consumer (and the bronze writer) until SIGINT/SIGTERM."""
    from lake.delta import DeltaLake

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts = opts or parse_args(argv)
    settings = Settings.from_env()
    url = redis_url_from_env(settings)
    client = redis_client(url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5)  # password/TLS from env
    lake = DeltaLake(settings.lake_uri) if opts.bronze else None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("streaming job %s reading %s as group %s on %s; bronze dual write %s", opts.consumer_name(), STREAM, GROUP,
             redact_url(url), f"to {lake.uri('bronze_events')} every {opts.bronze_window_ms} ms" if lake else "off")
    stats = run_job(client, lake, stop, opts, redis_url=url)
    log.info("streaming job stopped: %s", stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
