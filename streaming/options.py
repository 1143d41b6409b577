"""The streaming job's knobs: one dataclass shared by the CLI (`kairos stream`, `python -m streaming.job`) and
the Dagster op. Light on purpose (no numpy/pandas), so building the `kairos` parser stays fast."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass


@dataclass
class StreamJobOptions:
    """Knobs of one streaming job process."""

    consumer: str = ""
    batch: int = 200
    block_ms: int = 100
    reclaim_idle_ms: int = 60_000
    reclaim_every_s: float = 30.0
    session_ttl_s: int | None = None  # None: features.online.SESSION_TTL_S (30 minutes of inactivity)
    user_ttl_s: int | None = None     # None: streaming.job.USER_RECENT_TTL_S (7 days)
    bronze: bool = True
    bronze_window_ms: int = 10_000
    bronze_lock_ttl_ms: int = 10_000

    def consumer_name(self) -> str:
        return self.consumer or f"sessionizer-{os.uname().nodename}-{os.getpid()}"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The job's flags (environment variables give the defaults, flags win)."""
    d = StreamJobOptions()
    p.add_argument("--consumer", default=os.environ.get("KAIROS_STREAM_CONSUMER", ""),
                   help="consumer name in the group (default: host and pid); reuse it to resume its pending entries")
    p.add_argument("--batch", type=int, default=d.batch, help="entries per XREADGROUP (one transaction per batch)")
    p.add_argument("--reclaim-idle-ms", type=int, default=d.reclaim_idle_ms,
                   help="take over another consumer's unacknowledged entries idle this long (XAUTOCLAIM)")
    p.add_argument("--session-ttl-s", type=int, default=int(os.environ.get("KAIROS_SESSION_TTL_S", "0")) or None,
                   help="a session key expires after this much inactivity (default 1800)")
    p.add_argument("--no-bronze", action="store_true", help="do not append micro-batches to the bronze Delta table")
    p.add_argument("--bronze-window-ms", type=int, default=int(os.environ.get("KAIROS_BRONZE_WINDOW_MS", d.bronze_window_ms)),
                   help="stream time per bronze micro-batch (a divisor of a day)")
    p.add_argument("--bronze-lock-ttl-ms", type=int, default=d.bronze_lock_ttl_ms,
                   help="one bronze writer at a time: a dead writer's lock expires after this long")
    return p


def options_from_args(a: argparse.Namespace) -> StreamJobOptions:
    return StreamJobOptions(consumer=a.consumer, batch=a.batch, reclaim_idle_ms=a.reclaim_idle_ms,
                            session_ttl_s=a.session_ttl_s, bronze=not a.no_bronze, bronze_window_ms=a.bronze_window_ms,
                            bronze_lock_ttl_ms=a.bronze_lock_ttl_ms)


def parse_args(argv: list[str] | None) -> StreamJobOptions:
    p = argparse.ArgumentParser(prog="kairos stream", description="Redis Stream -> session keys (+ bronze dual write)")
    return options_from_args(add_arguments(p).parse_args(argv))
