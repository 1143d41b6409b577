"""The ranking server's Prometheus metrics: route labels bounded to known paths, 400s published as sent, the
stream gauges /readyz reports, and the serving / stream metric families."""
from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger("kairos.service")


# paths BentoML labels its request metrics with as they are; anything else (a 404) is labelled UNMATCHED_PATH,
# so random paths cannot grow /metrics without bound
KNOWN_PATHS = frozenset({"/", "/v1/personalize", "/v1/events", "/v1/status", "/metrics", "/healthz", "/livez",
                         "/readyz", "/docs", "/docs.json", "/schema.json", "/favicon.ico"})


KNOWN_PREFIXES = ("/static_content/",)  # Swagger UI assets: a fixed set of files


UNMATCHED_PATH = "/{unmatched}"


def metrics_path(path: str) -> str:
    """The label a request's path gets in the HTTP metrics: itself for a route, UNMATCHED_PATH otherwise."""
    return path if path in KNOWN_PATHS or path.startswith(KNOWN_PREFIXES) else UNMATCHED_PATH


def _label_metrics_by_route() -> None:
    """BentoML 1.4.39's traffic-metrics middleware labels by the raw request path (300 random 404s made /metrics
    1.3 MB). Hand it the route template instead for paths no route serves: they answer 404 all the same."""
    from bentoml._internal.server.http import instruments

    cls: Any = instruments.RunnerTrafficMetricsMiddleware  # BentoML's class, patched at runtime
    if getattr(cls, "_kairos_by_route", False):
        return
    original = cls.__call__

    async def __call__(self, scope, receive, send):
        if scope.get("type", "").startswith("http") and metrics_path(scope.get("path", "")) != scope.get("path"):
            scope = {**scope, "path": UNMATCHED_PATH, "raw_path": UNMATCHED_PATH.encode()}
        await original(self, scope, receive, send)

    cls.__call__ = __call__
    cls._kairos_by_route = True


def _publish_400_as_sent() -> None:
    """BentoML publishes a 400 whose `detail` is a string, but its validation errors send a list of
    {loc, msg, type}; publish what is sent (string or list), so clients and schemathesis agree with the server."""
    import importlib

    sdk_openapi: Any = importlib.import_module("_bentoml_sdk.service.openapi")  # BentoML's module, patched at runtime
    from bentoml._internal.service.openapi.specification import Schema

    if getattr(sdk_openapi, "_kairos_400", False):
        return
    original = sdk_openapi.exception_components_schema

    def components():
        out = original()
        for name, schema in out.items():
            props = getattr(schema, "properties", None) or {}
            if name == "InvalidArgument" and "detail" in props:
                item = Schema(type="object", properties={"loc": Schema(type="array"), "msg": Schema(type="string"),
                                                         "type": Schema(type="string")})
                props["detail"] = Schema(title="Error Detail", anyOf=[Schema(type="string"),
                                                                        Schema(type="array", items=item)])
        return out

    sdk_openapi.exception_components_schema = components
    sdk_openapi._kairos_400 = True


def _readyz_reports_stream() -> None:
    """/readyz keeps BentoML's verdict (200 once the service initialized, whatever the event stream's state: the
    ranker serves without it), and its 200 body says how the stream is — lag and pending per group, missing
    groups, the alert and why (`KairosRanker._stream_status`) — so the probe an operator reads shows it."""
    import anyio
    from _bentoml_impl.server import app as impl_app
    from starlette.responses import JSONResponse

    cls = impl_app.ServiceAppFactory
    if getattr(cls, "_kairos_readyz", False):
        return
    original = cls.readyz

    async def readyz(self, request):
        response = await original(self, request)
        status = getattr(self._service_instance, "_stream_status", None)
        if response.status_code != 200 or status is None:
            return response
        return JSONResponse({"ready": True, "stream": await anyio.to_thread.run_sync(status)})

    cls.readyz = readyz
    cls._kairos_readyz = True


class ServingMetrics:
    """Prometheus series on BentoML's /metrics: latency per stage, served_by counts, candidates per
    channel, feature-cache hits. Created in the worker (after BentoML set up its metrics registry)."""

    def __init__(self) -> None:
        from bentoml import metrics

        buckets = (0.25, 0.5, 1, 2, 3, 5, 8, 12, 20, 30, 50, 100, 250)
        self.stage = metrics.Histogram(name="kairos_stage_latency_ms", documentation="latency per request stage (ms)",
                                       labelnames=["stage"], buckets=buckets)
        self.served_by = metrics.Counter(name="kairos_served_by", documentation="answers per serving path",
                                         labelnames=["served_by"])
        self.candidates = metrics.Counter(name="kairos_candidates", documentation="candidates contributed per channel",
                                          labelnames=["channel"])
        self.cache = metrics.Counter(name="kairos_feature_cache", documentation="item rows served from the "
                                     "in-process row cache (hit) or read from Redis (miss)", labelnames=["result"])

    def observe(self, response: dict, cache_hits: int, cache_misses: int) -> None:
        for stage, ms in (response.get("latency_breakdown_ms") or {}).items():
            self.stage.labels(stage=stage).observe(float(ms))
        self.served_by.labels(served_by=str(response.get("served_by"))).inc()
        for channel, n in (response.get("candidate_channels") or {}).items():
            self.candidates.labels(channel=channel).inc(n)
        if cache_hits:
            self.cache.labels(result="hit").inc(cache_hits)
        if cache_misses:
            self.cache.labels(result="miss").inc(cache_misses)


class StreamMetrics:
    """Prometheus gauges of the event stream on /metrics, refreshed by a daemon thread every
    KAIROS_STREAM_METRICS_S (5 s): per consumer group the age of the oldest entry it has not finished
    (`kairos-sessionizer`: session freshness lag; `kairos-bronze`: stream -> Delta table lag) and its
    pending entries, and the stream length (after the job's trims: the unprocessed backlog)."""

    def __init__(self, client) -> None:
        from bentoml import metrics

        self.client = client
        self.lag = metrics.Gauge(name="kairos_stream_lag_ms", labelnames=["group"],
                                 documentation="age of the oldest stream entry the consumer group has not finished (ms)")
        self.pending = metrics.Gauge(name="kairos_stream_pending", labelnames=["group"],
                                     documentation="entries delivered to the group and not yet acknowledged")
        self.length = metrics.Gauge(name="kairos_stream_length",
                                    documentation="entries in the event stream (the unprocessed backlog after trims)")
        self.missing = metrics.Gauge(name="kairos_stream_group_missing", labelnames=["group"],
                                     documentation="1 while a registered consumer group of the stream is missing "
                                                   "(Redis lost it; retention is paused): alert on it")
        self._seen_missing: set[str] = set()

    def refresh(self) -> dict:
        from streaming.job import STREAM
        from streaming.retention import stream_lag

        lag = stream_lag(self.client, STREAM)
        self.length.set(lag["length"])
        for group, g in lag["groups"].items():
            self.lag.labels(group=group).set(g["lag_ms"])
            self.pending.labels(group=group).set(g["pending"])
        missing = set(lag.get("missing_groups") or [])
        for group in missing | self._seen_missing:
            self.missing.labels(group=group).set(1 if group in missing else 0)
        self._seen_missing |= missing
        return lag

    def run(self, stop: threading.Event, every_s: float) -> None:
        while not stop.wait(every_s):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - a metric is an aid, never a reason to fail
                log.debug("stream metrics not refreshed: %s", exc)
