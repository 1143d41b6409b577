"""Intake throughput with durability on and off: what `appendfsync always` costs `POST /v1/events`.

    .venv/bin/python bench/intake.py                       # 3 rounds x {always, everysec, no} x batch {1, 20, 200}
    .venv/bin/python bench/intake.py --events 4000 --rounds 2

For each fsync policy an embedded redis-server (orchestration.services.start_redis, AOF on, its own temp
directory) is started; the product's intake (streaming.intake.intake: the contract's validation, the
idempotent append script, the backpressure check) writes `--events` seeded events in batches of 1, 20 and
200 events from one producer and from 4 concurrent producers. Policies run interleaved, round by round, so
the machine's noise hits them alike; the table prints the median events/s per cell and its ratio to
`no` (fsync left to the OS: the loss window of durability off). Wall-clock varies +-50% on this shared box:
read the ratios.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POLICIES = ("always", "everysec", "no")


def _events(n: int, prefix: str, now_ms: int) -> list[dict]:
    return [{"event_id": f"{prefix}-{k}", "user_id": f"u{k % 500}", "session_id": f"s{k % 500}",
             "item_id": f"i{k % 300}", "event_type": "click" if k % 3 else "impression", "timestamp": now_ms - k,
             "position": k % 20, "device_type": "mobile", "page_context": "home_feed", "dwell_time_ms": 1000,
             "schema_version": 1} for k in range(n)]


def _run(url: str, events: list[dict], batch: int, producers: int) -> float:
    """events/s for `producers` threads each posting its share of `events` in batches of `batch`."""
    import redis

    from streaming.intake import intake

    shares = [events[i::producers] for i in range(producers)]
    clients = [redis.Redis.from_url(url, decode_responses=True) for _ in shares]
    errors: list[BaseException] = []

    def produce(client, share: list[dict]) -> None:
        try:
            for k in range(0, len(share), batch):
                out = intake(client, share[k:k + batch], max_backlog=10**9)
                assert not out["errors"], out["errors"][:1]
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(c, s)) for c, s in zip(clients, shares)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return len(events) / elapsed


def main(argv: list[str] | None = None) -> int:
    import redis

    from orchestration.services import redis_durability, start_redis

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", default="1,20,200")
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    root = Path(tempfile.mkdtemp(prefix="kairos-bench-intake-"))
    servers = {policy: start_redis(root / policy, appendfsync=policy) for policy in POLICIES}
    for policy, server in servers.items():
        info = redis_durability(redis.Redis.from_url(server.url))
        print(f"redis {policy}: appendonly {info['appendonly']}, appendfsync {info['appendfsync']}, "
              f"loss window on SIGKILL/power loss: {info['loss_window']}")
    cells = [(b, n) for b in batches for n in (1, 4)]
    results: dict[tuple[str, int, int], list[float]] = {}
    now_ms = int(time.time() * 1000)
    total = a.rounds * len(cells) * len(POLICIES)
    step = 0
    try:
        for r in range(a.rounds):
            for batch, producers in cells:
                for policy in POLICIES:  # interleaved: the same noise for each policy
                    step += 1
                    events = _events(a.events, f"{policy}-{r}-{batch}-{producers}", now_ms)
                    rate = _run(servers[policy].url, events, batch, producers)
                    results.setdefault((policy, batch, producers), []).append(rate)
                    print(f"[{step}/{total}] round {r + 1} batch {batch:>3} x {producers} producer(s) "
                          f"appendfsync {policy:<8} {rate:>8.0f} events/s", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    print("\nmedian events/s through streaming.intake.intake (ratio to appendfsync no)")
    print(f"{'batch':>5} {'producers':>9} " + " ".join(f"{p:>18}" for p in POLICIES))
    for batch, producers in cells:
        base = statistics.median(results[("no", batch, producers)])
        row = [f"{statistics.median(results[(p, batch, producers)]):>8.0f} ({statistics.median(results[(p, batch, producers)]) / base:4.2f}x)"
               for p in POLICIES]
        print(f"{batch:>5} {producers:>9} " + " ".join(f"{c:>18}" for c in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
