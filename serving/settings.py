"""The ranking server's settings, typed, read from the environment in one place.

Everything the serving path can be tuned with (README "Serving") is a field here with a constant default;
`ServeSettings.from_env` reads the KAIROS_* variables once, at the entry point (serving/service.py when BentoML
starts the service; serving/server.py checks them before it spawns a server), and the values are passed down
explicitly. No serving module reads the environment when it is imported, so importing one in a test, a bench
or a notebook never depends on what the shell happened to export.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from features.online import FRESH_WINDOW, ITEM_CACHE_ROWS
from features.online_write import PUBLISHED_KEEP
from ground.settings import env_flag, env_number
from serving.experiments import Experiment
from serving.rerank import RerankConfig
from streaming.options import LagThresholds
from streaming.retention import DEFAULT_MAX_BACKLOG


def cores() -> int:
    """CPUs this process may run on (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# variable -> what it sets (ServeSettings field); RerankConfig's are in serving.rerank.ENV_VARS
ENV_VARS: dict[str, str] = {
    "model_poll_s": "KAIROS_MODEL_POLL_S",
    "redis_timeout_s": "KAIROS_REDIS_TIMEOUT_S",
    "intake_timeout_s": "KAIROS_INTAKE_TIMEOUT_S",
    "threads": "KAIROS_SERVE_THREADS",
    "workers": "KAIROS_SERVE_WORKERS",
    "access_log": "KAIROS_ACCESS_LOG",
    "impression_log": "KAIROS_IMPRESSION_LOG",
    "api_key": "KAIROS_API_KEY",
    "max_body_bytes": "KAIROS_MAX_BODY_BYTES",
    "stream_metrics_s": "KAIROS_STREAM_METRICS_S",
    "stale_max_age_s": "KAIROS_STALE_FEATURES_MAX_AGE_S",
    "item_cache_rows": "KAIROS_ITEM_CACHE_ROWS",
    "fresh_window": "KAIROS_FRESH_WINDOW",
    "max_backlog": "KAIROS_STREAM_MAX_BACKLOG",
    "compiled_ranker": "KAIROS_COMPILED_RANKER",
    "shadow": "KAIROS_SHADOW",
    "canary_share": "KAIROS_CANARY_SHARE",
    "profile_out": "KAIROS_PROFILE_OUT",
    "switch_interval_ms": "KAIROS_SWITCH_INTERVAL_MS",
    "pipeline_on_loop": "KAIROS_PIPELINE_ON_LOOP",
}
# `experiment` is KAIROS_EXPERIMENT (+ KAIROS_EXPERIMENT_MODE), parsed by serving.experiments.Experiment.from_env


@dataclass(frozen=True)
class ServeSettings:
    model_poll_s: float = 10.0  # how often the champion alias is re-read (a promotion goes live within this)
    redis_timeout_s: float = 0.1  # the ranking path's Redis socket timeout: a slow Redis degrades, never stalls
    intake_timeout_s: float = 2.0  # the event intake waits for an fsync: a slow disk is a slow 200, not a retry
    threads: int = 4  # per worker
    # worker processes, one per core by default (0 = that): the pipeline is CPU-bound Python, so threads of one
    # process contend for its GIL; each worker loads its own bundle, compiled ranker and item cache
    workers: int = 0
    access_log: bool = True
    impression_log: bool = True
    api_key: str | None = None  # set: /v1/* requires the header x-api-key
    max_body_bytes: int = 1 << 20  # 1 MiB: 1,000 events fit in ~300 kB
    stream_metrics_s: float = 5.0  # how often the event stream's lag is re-read for /metrics
    # the stream alert in /readyz and /v1/status: the thresholds (and variables) of Dagster's stream_lag_sensor
    stream_lag: LagThresholds = field(default_factory=LagThresholds)
    stale_max_age_s: float = 3600.0  # the in-process copy of a user's features served while Redis is down
    item_cache_rows: int = ITEM_CACHE_ROWS  # decoded item rows kept per worker
    fresh_window: int = FRESH_WINDOW  # newest items the fresh channel looks at
    max_backlog: int = DEFAULT_MAX_BACKLOG  # /v1/events refuses a batch (429) that would pass this stream backlog
    compiled_ranker: bool = True  # serve the lleaves-compiled ranker once it is ready (False: LightGBM's predict)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    # online experiments (serving/experiments.py); set, they override the registry's rollout state
    experiment: Experiment | None = None  # users in its share get the challenger (or an interleaving)
    shadow: bool = False  # the challenger also scores every champion request, logged, never shown
    canary_share: float | None = None  # overrides the canary share of the rollout state
    # set: each worker samples its threads' stacks (serving.sampler) into <this>.<pid>.txt / .collapsed
    profile_out: str | None = None
    # the worker's sys.setswitchinterval in ms (0: Python's 5 ms): how long a thread holding the GIL keeps it
    # while another (the event loop, the pipeline thread) waits for it
    switch_interval_ms: float = 0.0
    # /v1/personalize runs the pipeline on the worker's event loop thread (True) or hands it to a thread under a
    # one-slot limiter (False). On the loop, a worker busy with a request does not accept connections, so a
    # keep-alive client's connections spread over the workers more often: in 3 A/B runs one worker held every
    # connection in 8 of 12 load rows with the hand-off, 2 of 12 on the loop (README "Measured", issue 21)
    pipeline_on_loop: bool = True

    @property
    def worker_count(self) -> int:
        """`workers`, or one per core when it is 0."""
        return self.workers if self.workers > 0 else cores()

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "ServeSettings":
        """The settings the KAIROS_* variables describe (unset or blank ones keep the defaults); a value that does
        not parse or is out of range raises ValueError naming its variable."""
        d = cls()
        v = ENV_VARS
        return cls(
            model_poll_s=env_number(env, v["model_poll_s"], float, d.model_poll_s, 0.0),
            redis_timeout_s=env_number(env, v["redis_timeout_s"], float, d.redis_timeout_s, 0.0),
            intake_timeout_s=env_number(env, v["intake_timeout_s"], float, d.intake_timeout_s, 0.0),
            threads=env_number(env, v["threads"], int, d.threads, 1),
            workers=env_number(env, v["workers"], int, d.workers, 0),
            access_log=env_flag(env, v["access_log"], d.access_log),
            impression_log=env_flag(env, v["impression_log"], d.impression_log),
            api_key=env.get(v["api_key"]) or None,
            max_body_bytes=env_number(env, v["max_body_bytes"], int, d.max_body_bytes, 1),
            stream_metrics_s=env_number(env, v["stream_metrics_s"], float, d.stream_metrics_s, 0.0),
            stream_lag=LagThresholds.from_env(env),
            stale_max_age_s=env_number(env, v["stale_max_age_s"], float, d.stale_max_age_s, 0.0),
            item_cache_rows=env_number(env, v["item_cache_rows"], int, d.item_cache_rows, 0),
            fresh_window=env_number(env, v["fresh_window"], int, d.fresh_window, 1, PUBLISHED_KEEP),
            max_backlog=env_number(env, v["max_backlog"], int, d.max_backlog, 1),
            compiled_ranker=env_flag(env, v["compiled_ranker"], d.compiled_ranker),
            rerank=RerankConfig.from_env(env),
            experiment=Experiment.from_env(env),
            shadow=env_flag(env, v["shadow"], d.shadow),
            canary_share=env_number(env, v["canary_share"], float, d.canary_share, 0.0, 1.0),
            profile_out=env.get(v["profile_out"]) or None,
            switch_interval_ms=env_number(env, v["switch_interval_ms"], float, d.switch_interval_ms, 0.0),
            pipeline_on_loop=env_flag(env, v["pipeline_on_loop"], d.pipeline_on_loop),
        )


__all__ = ["ENV_VARS", "ServeSettings", "cores"]
