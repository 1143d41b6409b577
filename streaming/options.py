"""The streaming job's knobs: one dataclass shared by the CLI (`kairos stream`, `python -m streaming.job`) and
the Dagster op. Light on purpose (no numpy/pandas), so building the `kairos` parser stays fast."""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Mapping

from ground.settings import env_number
from streaming.retention import STREAM_LAG_ALERT_MS, STREAM_LAG_ALERT_PENDING

# field -> the environment variable that sets its default (a flag given on the command line wins)
ENV_VARS: dict[str, str] = {
    "consumer": "KAIROS_STREAM_CONSUMER",
    "session_ttl_s": "KAIROS_SESSION_TTL_S",
    "bronze_window_ms": "KAIROS_BRONZE_WINDOW_MS",
}


@dataclass(frozen=True)
class LagThresholds:
    """When a consumer group's lag is an alert (`streaming.retention.lag_decision`): one definition and one read of
    KAIROS_STREAM_LAG_ALERT_MS / _PENDING for Dagster's stream_lag_sensor and the server's /readyz and /v1/status."""

    max_lag_ms: int = STREAM_LAG_ALERT_MS
    max_pending: int = STREAM_LAG_ALERT_PENDING

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "LagThresholds":
        d = cls()
        return cls(max_lag_ms=env_number(env, "KAIROS_STREAM_LAG_ALERT_MS", int, d.max_lag_ms, 0),
                   max_pending=env_number(env, "KAIROS_STREAM_LAG_ALERT_PENDING", int, d.max_pending, 0))


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

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "StreamJobOptions":
        """The defaults with the ENV_VARS applied; a bad value raises ValueError naming its variable."""
        d = cls()
        return cls(consumer=env.get(ENV_VARS["consumer"], "").strip(),
                   session_ttl_s=env_number(env, ENV_VARS["session_ttl_s"], int, 0, 0) or None,
                   bronze_window_ms=env_number(env, ENV_VARS["bronze_window_ms"], int, d.bronze_window_ms, 1))

    def consumer_name(self) -> str:
        return self.consumer or f"sessionizer-{os.uname().nodename}-{os.getpid()}"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The job's flags. Building the parser reads no environment (it is part of every `kairos` command);
    `options_from_args` applies the variables (ENV_VARS) under the flags."""
    d = StreamJobOptions()
    p.add_argument("--consumer", default=None,
                   help="consumer name in the group (default: KAIROS_STREAM_CONSUMER, else host and pid); reuse it "
                        "to resume its pending entries")
    p.add_argument("--batch", type=int, default=d.batch, help="entries per XREADGROUP (one transaction per batch)")
    p.add_argument("--reclaim-idle-ms", type=int, default=d.reclaim_idle_ms,
                   help="take over another consumer's unacknowledged entries idle this long (XAUTOCLAIM)")
    p.add_argument("--session-ttl-s", type=int, default=None,
                   help="a session key expires after this much inactivity (default: KAIROS_SESSION_TTL_S, else 1800)")
    p.add_argument("--no-bronze", action="store_true", help="do not append micro-batches to the bronze Delta table")
    p.add_argument("--bronze-window-ms", type=int, default=None,
                   help=f"stream time per bronze micro-batch, a divisor of a day (default: KAIROS_BRONZE_WINDOW_MS, "
                        f"else {d.bronze_window_ms})")
    p.add_argument("--bronze-lock-ttl-ms", type=int, default=d.bronze_lock_ttl_ms,
                   help="one bronze writer at a time: a dead writer's lock expires after this long")
    return p


def options_from_args(a: argparse.Namespace, env: Mapping[str, str] = os.environ) -> StreamJobOptions:
    """The parsed flags over `StreamJobOptions.from_env(env)`: a flag given wins over its variable."""
    base = StreamJobOptions.from_env(env)
    flags = {"consumer": a.consumer, "session_ttl_s": a.session_ttl_s, "bronze_window_ms": a.bronze_window_ms}
    return dataclasses.replace(base, batch=a.batch, reclaim_idle_ms=a.reclaim_idle_ms, bronze=not a.no_bronze,
                               bronze_lock_ttl_ms=a.bronze_lock_ttl_ms,
                               **{k: v for k, v in flags.items() if v is not None})


def parse_args(argv: list[str] | None) -> StreamJobOptions:
    p = argparse.ArgumentParser(prog="kairos stream", description="Redis Stream -> session keys (+ bronze dual write)")
    return options_from_args(add_arguments(p).parse_args(argv))
