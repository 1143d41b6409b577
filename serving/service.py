"""The BentoML ranking service: `POST /v1/personalize` over serving.pipeline.personalize.

    bentoml serve serving.service:KairosRanker       (or `kairos serve`, see serving/server.py)

At start it loads the MLflow champion bundle (models.registry.load_alias) and
connects the online store to REDIS_URL (or the embedded server's URL) with a short
socket timeout, so a slow or dead Redis degrades to popularity instead of stalling.
A background thread re-reads the champion alias every KAIROS_MODEL_POLL_S seconds
(default 10) and swaps the whole bundle atomically (one attribute assignment) when
the alias points at a new version: a promotion or rollback goes live in seconds and
a server started before any model existed picks the first champion up by itself.
The same thread keeps the current online-store snapshot's item table warm.

Routes: POST /v1/personalize (body: PersonalizeRequest; a malformed body or a value out
of range, e.g. request_config.num_results outside 1..100, is a 400 naming the field),
POST /v1/status (model/feature versions), and BentoML's own GET /healthz, /livez,
/readyz (ready once the service has initialized: it always answers, with fallbacks
when a dependency is missing). A failed dependency never becomes a 5xx: the pipeline
falls back to popularity and says so in `served_by`.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid

from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional, cast

import bentoml
from pydantic import BaseModel, ConfigDict, Field

from ground.settings import Settings, redis_client, redis_url_from_env
from serving.request import DEFAULT_NUM_RESULTS, DEFAULT_POOL, ID_MAX, LABEL_MAX, MAX_NUM_RESULTS, MAX_POOL
from serving.settings import ServeSettings

if TYPE_CHECKING:
    from starlette.responses import Response

    from features.online import OnlineStore
    from models.bundle import Bundle
    from serving.experiments import Experiment, ServingPlan
    from serving.impressions import ImpressionLogger

log = logging.getLogger("kairos.service")

# The entry point: BentoML imports this module to start the service, and its decorator needs the worker and
# thread counts when the class is defined, so the environment is read here, once, into typed settings
# (serving/settings.py, the experiment switches included) that everything below receives explicitly; no other
# serving module reads it (REDIS_URL and the lake are ground.settings.Settings, built when the service initializes).
SETTINGS = ServeSettings.from_env()


class ApiKeyMiddleware:
    """Pure-ASGI check of the `x-api-key` header on /v1/* (health, readiness and /metrics stay open)."""

    def __init__(self, app, key: str, prefix: str = "/v1/") -> None:
        self.app, self.key, self.prefix = app, key.encode(), prefix

    async def __call__(self, scope, receive, send) -> None:
        import hmac

        if scope.get("type") == "http" and scope.get("path", "").startswith(self.prefix):
            provided = dict(scope.get("headers") or []).get(b"x-api-key", b"")
            if not hmac.compare_digest(provided, self.key):
                body = json.dumps({"error": "unauthorized",
                                   "detail": "missing or wrong x-api-key header (KAIROS_API_KEY is set)"}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


try:  # a C JSON encoder for the answers (several times faster than json.dumps); json when not installed
    import orjson

    def dumps(payload: dict) -> bytes:
        return orjson.dumps(payload, default=str, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
except ImportError:  # pragma: no cover - orjson is pinned in requirements.lock
    def dumps(payload: dict) -> bytes:
        return json.dumps(payload, separators=(",", ":"), default=str).encode()


def _json_response(status: int, payload: dict, headers: list | None = None) -> tuple[dict, dict]:
    body = dumps(payload)
    return ({"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *(headers or [])]},
            {"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Pure-ASGI request guard: a body over `max_bytes` is a 413 before any handler parses (or echoes) it (a
    declared Content-Length is checked up front; a chunked body is read up to the limit and replayed), and a
    /v1/* body that is not JSON is a 415 (BentoML answered a multipart body with a 500)."""

    def __init__(self, app, max_bytes: int = ServeSettings.max_body_bytes) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, send, size: str) -> None:
        start, body = _json_response(413, {"error": "request body too large",
                                           "detail": f"the body is {size} bytes; the limit is {self.max_bytes} "
                                                     "(KAIROS_MAX_BODY_BYTES): send fewer events per request"})
        await send(start)
        await send(body)

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        media = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        if scope.get("path", "").startswith("/v1/") and media not in (b"application/json", b""):
            start, refusal = _json_response(415, {"error": "unsupported media type", "detail":
                                                  f"Content-Type {media.decode(errors='replace')!r}: send application/json"})
            await send(start)
            await send(refusal)
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, declared.decode())
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._refuse(send, f"more than {size}")
                return
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ClientErrorLogFilter(logging.Filter):
    """BentoML logs every 400 (a body that fails validation) as ERROR with a 25-line traceback: a client's
    mistake is not a server error. Turn those records into one WARNING line naming the route and the fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        from pydantic import ValidationError

        from bentoml.exceptions import BentoMLException

        if isinstance(exc, ValidationError):
            fields = "; ".join(".".join(str(p) for p in e.get("loc", ())) + f": {e.get('msg')}" for e in exc.errors())
            what = f"400 {exc.error_count()} validation error(s): {fields}"
        elif isinstance(exc, BentoMLException) and int(getattr(exc.error_code, "value", 500)) < 500:
            what = f"{int(exc.error_code.value)} {type(exc).__name__}: {exc}"
        else:
            return True  # a real server error keeps its traceback
        record.msg, record.args = "client error on %s: %s", (record.getMessage().removeprefix("Exception on "), what[:500])
        record.levelno, record.levelname, record.exc_info, record.exc_text = logging.WARNING, "WARNING", None, None
        return True


def _install_client_error_filter() -> None:
    target = logging.getLogger("bentoml._internal.server.http_app")
    if not any(isinstance(f, ClientErrorLogFilter) for f in target.filters):
        target.addFilter(ClientErrorLogFilter())


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


for _patch in (_install_client_error_filter, _label_metrics_by_route, _publish_400_as_sent, _readyz_reports_stream):
    try:
        _patch()
    except Exception as _exc:  # noqa: BLE001 - an aid; serving does not depend on it
        log.warning("%s not applied: %s", _patch.__name__, _exc)


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


# ---------------------------------------------------------------------------- the HTTP contract
# The request body, exactly (DESIGN "The ranking request"); unknown fields are refused. BentoML
# validates the body against these models before the handler runs and answers 400 with the
# failing field's location (e.g. ["request_config", "num_results"]) on any violation. The limits are
# serving.request's (ID_MAX, LABEL_MAX, MAX_NUM_RESULTS, ...), and its validate_request, which every request
# also passes (in serving.pipeline.personalize), enforces the same ones for in-process callers (and refuses a blank user_id).


def openapi30(schema: dict) -> None:
    """pydantic writes JSON Schema 2020-12 (`anyOf [X, {type: null}]`, a numeric `exclusiveMinimum`); BentoML
    publishes it as OpenAPI 3.0.2, where both are invalid (schemathesis cannot generate from them). Rewrite a
    model's properties in 3.0 terms: `nullable: true` and `minimum` + `exclusiveMinimum: true`."""
    for prop in (schema.get("properties") or {}).values():
        variants = prop.get("anyOf")
        if variants and any(v.get("type") == "null" for v in variants):
            rest = [v for v in variants if v.get("type") != "null"]
            prop.pop("anyOf")
            if len(rest) == 1:
                prop.update(rest[0])
            else:
                prop["anyOf"] = rest
            prop["nullable"] = True
            if prop.get("default", 0) is None:
                prop.pop("default")
        if isinstance(prop.get("exclusiveMinimum"), (int, float)) and not isinstance(prop["exclusiveMinimum"], bool):
            prop["minimum"], prop["exclusiveMinimum"] = prop["exclusiveMinimum"], True


class RequestContext(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=openapi30)

    session_id: Optional[Annotated[str, Field(max_length=ID_MAX)]] = None
    device_type: Optional[Annotated[str, Field(max_length=LABEL_MAX)]] = Field(
        default=None, description="mobile | desktop | tablet")
    timestamp_ms: Optional[Annotated[int, Field(strict=True, ge=0)]] = Field(
        default=None, description="the request clock (epoch ms); the server's clock if omitted")
    geo_region: Optional[Annotated[str, Field(max_length=LABEL_MAX)]] = None


class RequestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=openapi30)

    num_results: Annotated[int, Field(strict=True, ge=1, le=MAX_NUM_RESULTS)] = DEFAULT_NUM_RESULTS
    candidate_pool_size: Annotated[int, Field(strict=True, ge=1, le=MAX_POOL)] = DEFAULT_POOL
    max_latency_ms: Optional[Annotated[float, Field(gt=0)]] = None


class EventsRequest(BaseModel):
    """A batch of raw events; each is judged on its own (per-event errors, never a whole-batch 400)."""

    model_config = ConfigDict(extra="forbid")

    events: Annotated[list, Field(min_length=1, max_length=1000)]


class PersonalizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {
        "user_id": "u00001", "surface": "home_feed",
        "context": {"session_id": "s1", "device_type": "mobile", "timestamp_ms": 1768000000000, "geo_region": "eu"},
        "request_config": {"num_results": 10, "candidate_pool_size": 200, "max_latency_ms": 100}}})

    user_id: Annotated[str, Field(min_length=1, max_length=ID_MAX,
                                  description="the user to rank for; an unknown id gets a cold-start answer "
                                              "(session clicks, segment popularity)")]
    surface: Annotated[str, Field(max_length=LABEL_MAX,
                                  description="where the list is shown (home_feed, search, ...)")] = "home_feed"
    context: RequestContext = Field(default_factory=RequestContext)
    request_config: RequestConfig = Field(default_factory=RequestConfig)


# ---- the answer (OpenAPI response schema of POST /v1/personalize). The handler serializes the pipeline's dict
# itself (no pydantic pass per request); these models document it, with an answer measured on the demo world.
class RankedItem(BaseModel):
    model_config = ConfigDict(json_schema_extra=openapi30)

    item_id: str
    score: float = Field(description="the ranker's score (higher first)")
    rank: int = Field(ge=1, description="1-based position in the list")
    propensity: Optional[float] = Field(default=None, description="probability this item was shown in this slot "
                                                                  "(exploration); logged for off-policy evaluation")


class LatencyBreakdown(BaseModel):
    feature_fetch: float = Field(description="ms: user features + session state, one Redis round trip")
    candidate_retrieval: float = Field(description="ms: ANN, co-visitation, trending, fresh channels")
    ranking_inference: float = Field(description="ms: LightGBM over the shared feature functions")
    post_processing: float = Field(description="ms: MMR diversity, business rules, exploration")
    total: float = Field(description="ms inside the pipeline")


class ExperimentArm(BaseModel):
    name: str
    arm: str = Field(description="champion, challenger, canary or interleaved")


PERSONALIZE_EXAMPLE = {
        "request_id": "3f0c2a9e5b7d4c1e8a6f2b0d9c4e7a15", "user_id": "u00001", "surface": "home_feed",
        "ranked_items": [{"item_id": "i00217", "score": 0.412983, "rank": 1, "propensity": 1.0},
                         {"item_id": "i00031", "score": 0.387214, "rank": 2, "propensity": 1.0},
                         {"item_id": "i00158", "score": 0.351077, "rank": 3, "propensity": 1.0}],
        "model_version": "1", "feature_version": "u14-i14-1768348800000", "served_by": "two_stage",
        "latency_breakdown_ms": {"feature_fetch": 0.61, "candidate_retrieval": 1.12, "ranking_inference": 2.35,
                                 "post_processing": 0.48, "total": 4.71},
        "candidate_channels": {"ann": 100, "item_similarity": 30, "co_visitation": 30, "trending": 25, "fresh": 15}}


def _response_schema(schema: dict) -> None:
    """OpenAPI 3.0 nullable fields (openapi30) plus a real example answer."""
    openapi30(schema)
    schema["example"] = PERSONALIZE_EXAMPLE


class PersonalizeResponse(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra=_response_schema)

    request_id: str = Field(description="quote it to `kairos lineage --request-id`")
    user_id: str
    surface: Optional[str] = None
    ranked_items: list[RankedItem]
    model_version: Optional[str] = Field(default=None, description="the MLflow model version that ranked")
    feature_version: Optional[str] = Field(default=None, description="the online-store snapshot the features came from")
    served_by: str = Field(description="two_stage, two_stage:missing_features (the online store is empty: "
                                       "defaults, named in missing_features), two_stage:stale_features, or "
                                       "popularity_fallback:<reason>")
    missing_features: Optional[list[str]] = Field(
        default=None, description="feature groups served as registry defaults (the online store holds no snapshot "
                                  "and is being rebuilt); only with served_by two_stage:missing_features")
    stale_feature_age_s: Optional[float] = Field(
        default=None, description="age of this server's last read of the user's features; only with served_by "
                                  "two_stage:stale_features")
    latency_breakdown_ms: LatencyBreakdown
    candidate_channels: dict[str, int] = Field(default_factory=dict, description="candidates each channel contributed")
    channel_errors: Optional[dict[str, str]] = Field(default=None, description="channels dropped (timeout, error)")
    over_budget: Optional[bool] = Field(default=None, description="true when slower than max_latency_ms")
    experiment: Optional[ExperimentArm] = None


def _example(example: dict):
    """json_schema_extra for an answer model: OpenAPI 3.0 nullable fields plus a real example (Swagger shows it)."""
    def extra(schema: dict) -> None:
        openapi30(schema)
        schema["example"] = example
    return extra


# ---- the answers of POST /v1/events and /v1/status (examples from a demo server: what Swagger shows instead of
# `{additionalProp1: {}}`). The handlers serialize their dicts themselves; these models document them.
class EventError(BaseModel):
    model_config = ConfigDict(json_schema_extra=openapi30)

    index: int = Field(description="position of the refused event in the batch")
    event_id: Optional[str] = None
    field: str = Field(description="the field that broke the event contract")
    reason: str


class IntakeCounts(BaseModel):
    received: int
    accepted: int
    quarantined: int
    duplicates: int


EVENTS_EXAMPLE = {
    "accepted": ["e-20260114-000001", "e-20260114-000002"], "stream_ids": ["1768348800123-0", "1768348800123-1"],
    "errors": [{"index": 2, "event_id": "e-20260114-000003", "field": "device_type",
                "reason": "device_type_known: device_type 'toaster' is not one of ['mobile', 'desktop', 'tablet']"}],
    "duplicates": [], "counts": {"received": 3, "accepted": 2, "quarantined": 1, "duplicates": 0}}


class EventsResponse(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra=_example(EVENTS_EXAMPLE))

    accepted: list[str] = Field(description="event ids written to the stream (each once, by event_id)")
    stream_ids: list[str] = Field(description="their Redis stream ids (a duplicate's first id)")
    errors: list[EventError] = Field(description="refused events, quarantined with the reason")
    duplicates: list[str] = Field(description="accepted ids that were already in the stream")
    counts: IntakeCounts


class RolloutState(BaseModel):
    model_config = ConfigDict(json_schema_extra=openapi30)

    source: str = Field(description="registry (the rollout stage), env (KAIROS_EXPERIMENT/SHADOW) or none")
    shadow: bool
    candidate_alias: str = Field(description="challenger or canary: the alias the candidate model loads from")
    experiment: Optional[str] = None
    share: Optional[float] = None


STATUS_EXAMPLE = {
    "model_version": "3", "feature_version": "u14-i14-1768348800000", "ranker_scorer": "lleaves",
    "worker_pid": 41822, "challenger_version": "4",
    "rollout": {"source": "registry", "shadow": True, "candidate_alias": "challenger", "experiment": None,
                "share": None},
    "redis_ok": True, "time_ms": 1768352400000,
    "impressions": {"logged": 64, "dropped": 0, "queued": 0},
    "stream": {"stream": "kairos:events", "length": 3, "missing_groups": [],
               "groups": {"kairos-sessionizer": {"pending": 0, "last_delivered_id": "1768348800123-1", "lag_ms": 0}}}}


class StatusResponse(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra=_example(STATUS_EXAMPLE))

    model_version: Optional[str] = Field(default=None, description="the champion this worker serves")
    feature_version: Optional[str] = Field(default=None, description="the online-store snapshot it reads")
    ranker_scorer: Optional[str] = Field(default=None, description="lightgbm, or lleaves when compiled")
    worker_pid: int
    challenger_version: Optional[str] = None
    rollout: Optional[RolloutState] = None
    redis_ok: bool
    time_ms: int = Field(description="the server's clock (ms since epoch)")
    impressions: Optional[dict[str, Any]] = Field(default=None, description="impression logger counters")
    stream: Optional[dict[str, Any]] = Field(default=None, description="event-stream length and per-group lag")


@bentoml.service(name="kairos_ranker", workers=SETTINGS.worker_count, threads=SETTINGS.threads, traffic={"timeout": 30},
                 logging={"access": {"enabled": SETTINGS.access_log}})
class KairosRanker:
    def __init__(self) -> None:
        try:
            import torch

            torch.set_num_threads(1)
        except Exception:  # noqa: BLE001
            pass
        from features.online import OnlineStore

        self.settings = Settings.from_env()
        self.serve = SETTINGS
        self.bundle: Bundle | None = None
        self.store: OnlineStore | None = None
        self.impressions: ImpressionLogger | None = None
        self.metrics: ServingMetrics | None = None
        self._cache_seen = (0, 0)
        self._stop = threading.Event()
        try:
            self.metrics = ServingMetrics()
        except Exception as exc:  # noqa: BLE001 - metrics are an aid, never a reason not to serve
            log.warning("Prometheus metrics unavailable: %s", exc)
        self.intake_client = None
        try:
            self.store = OnlineStore.from_url(redis_url_from_env(self.settings), timeout_s=self.serve.redis_timeout_s,
                                              item_cache_rows=self.serve.item_cache_rows,
                                              fresh_window=self.serve.fresh_window)
            # the intake waits for an fsync (appendfsync always): it gets its own client with a longer timeout than
            # the ranking path's 100 ms, so a slow disk is a slow 200, not a timeout the producer must retry
            self.intake_client = redis_client(redis_url_from_env(self.settings), decode_responses=True, socket_timeout=self.serve.intake_timeout_s,
                                              socket_connect_timeout=self.serve.intake_timeout_s)
            if self.serve.impression_log:
                from serving.impressions import ImpressionLogger

                self.impressions = ImpressionLogger(self.store.client)
        except Exception as exc:  # noqa: BLE001 - no Redis configured: serve popularity from the bundle
            log.warning("online store not configured (%s); requests will use the popularity fallback", exc)
        from concurrent.futures import ThreadPoolExecutor

        self._env_experiment = self.serve.experiment
        self._env_shadow = self.serve.shadow
        self._env_canary_share = self.serve.canary_share
        self.experiment: Experiment | None = self._env_experiment
        self.shadow = self._env_shadow
        self.plan: ServingPlan | None = None
        self.challenger: Bundle | None = None
        self._previous: Bundle | None = None  # the last champion, kept in memory: a rollback to it is one reference swap
        self._shadow_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kairos-shadow")
        self._limiter: Any = None  # anyio.CapacityLimiter(1) for /v1/personalize, made on the event loop
        self._load_champion()
        self._apply_rollout()
        self._load_challenger()
        self._warm_store()
        self._thread = threading.Thread(target=self._refresh_loop, name="kairos-model-refresh", daemon=True)
        self._thread.start()
        self._start_stream_metrics()
        self._ready = True
        log.info("KairosRanker ready: model_version=%s", getattr(self.bundle, "model_version", None))

    # ------------------------------------------------------------------ model lifecycle
    def _load_champion(self, wanted: str | None = None) -> None:
        """Serve the champion alias (`wanted`: its version when the caller has just read it)."""
        from models.registry import alias_version, load_alias

        try:
            previous = self._previous
            bundle: Bundle | None
            wanted = wanted if wanted is not None else alias_version(self.settings, "champion")
            if previous is not None and wanted is not None and str(previous.model_version) == str(wanted):
                bundle = previous  # a rollback to the version served before: no download, no load
            else:
                bundle = load_alias(self.settings, alias="champion")
        except Exception as exc:  # noqa: BLE001 - registry down or empty: keep serving what we have
            log.warning("could not load the champion: %s", exc)
            return
        if bundle is None:
            if self.bundle is None:
                log.warning("no champion registered yet; serving popularity until one appears")
            return
        if bundle is not previous:
            self._compile_ranker(bundle)
        old = getattr(self.bundle, "model_version", None)
        if self.bundle is not None and str(old) != str(bundle.model_version):
            self._previous = self.bundle
        self.bundle = bundle  # one reference swap: requests see the old or the new bundle, never a mix
        log.info("serving model version %s (was %s)", bundle.model_version, old)

    def _compile_ranker(self, bundle) -> None:
        """Compile the version's exported ranker file once (serving.compiled_ranker; cached on disk for the other
        workers and restarts) in a background thread; LightGBM serves until it is ready or if it cannot be."""
        from serving.compiled_ranker import CACHE_DIRNAME, attach

        try:
            attach(bundle, self.settings.home / CACHE_DIRNAME, background=True, enabled=self.serve.compiled_ranker)
        except Exception as exc:  # noqa: BLE001 - LightGBM serves
            log.warning("ranker compilation not started: %s", exc)

    def _apply_rollout(self, state: Any = None) -> None:
        """Env experiment/shadow settings win; else the registry's rollout stage (shadow, canary share); `state`:
        a RolloutState the caller has just read."""
        from models.rollout import rollout_state
        from serving.experiments import serving_plan

        if self._env_experiment is not None:
            state = None
        elif state is None:
            try:
                state = rollout_state(self.settings)
            except Exception as exc:  # noqa: BLE001 - registry unreachable: keep the current plan
                log.warning("could not read the rollout state: %s", exc)
                return
        plan = serving_plan(self._env_experiment, self._env_shadow, state, self._env_canary_share)
        if plan != self.plan:
            log.info("serving plan: experiment %s, shadow %s, candidate alias %s (from %s)", plan.experiment,
                     plan.shadow, plan.candidate_alias, plan.source)
        self.plan, self.experiment, self.shadow = plan, plan.experiment, plan.shadow

    def _load_challenger(self) -> None:
        """The candidate alias (`challenger`, or `canary` in a canary), when an experiment or shadow mode
        needs it and it differs from the champion."""
        if self.plan is None or not self.plan.needs_candidate:
            self.challenger = None
            return
        from models.registry import alias_version, load_alias

        alias = self.plan.candidate_alias
        try:
            version = alias_version(self.settings, alias)
            champion = getattr(self.bundle, "model_version", None)
            if version is None or str(version) == str(champion):
                self.challenger = None
                return
            if str(getattr(self.challenger, "model_version", "")) != str(version):
                self.challenger = load_alias(self.settings, alias=alias)
                if self.challenger is not None:
                    self._compile_ranker(self.challenger)
                log.info("challenger model version %s loaded (experiment %s, shadow %s)", version,
                         self.experiment, self.shadow)
        except Exception as exc:  # noqa: BLE001 - no challenger: everyone gets the champion
            log.warning("could not load the challenger: %s", exc)

    def _champion_version(self) -> str | None:
        from models.registry import alias_version

        v = alias_version(self.settings, "champion")
        return None if v is None else str(v)

    def _warm_store(self) -> None:
        if self.store is None:
            return
        try:
            self.store.warm()
        except Exception as exc:  # noqa: BLE001
            log.warning("could not warm the online store: %s", exc)

    def _refresh_once(self) -> None:
        """One registry read (the registered model: its aliases and rollout tags) per poll; the champion or the
        challenger is loaded only when its alias points at another version than the one served."""
        from models.rollout import rollout_state

        state = rollout_state(self.settings)
        current = getattr(self.bundle, "model_version", None)
        latest = state.champion
        if latest is not None and latest != (None if current is None else str(current)):
            self._load_champion(latest)
        self._apply_rollout(state)
        plan = self.plan
        if plan is None or not plan.needs_candidate:
            self.challenger = None
            return
        wanted = state.aliases.get(plan.candidate_alias)
        champion = str(getattr(self.bundle, "model_version", None))
        served = None if self.challenger is None else str(self.challenger.model_version)
        if (wanted is None or wanted == champion) and served is None:
            return  # no challenger to serve, none served
        if wanted is not None and wanted == served and wanted != champion:
            return  # the challenger served is the one the alias points at
        self._load_challenger()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.serve.model_poll_s):
            try:
                self._refresh_once()
            except Exception as exc:  # noqa: BLE001
                log.warning("champion check failed: %s", exc)
            self._warm_store()

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self._stop.set()
        if self.impressions is not None:
            self.impressions.close()

    def __is_ready__(self) -> bool:
        return bool(getattr(self, "_ready", False))

    # ------------------------------------------------------------------ routes
    # each route answers with a serialized Response (no pydantic pass over the output); output_spec publishes its schema
    @bentoml.api(route="/v1/personalize", output_spec=PersonalizeResponse)
    async def personalize(self, body: PersonalizeRequest, /) -> Response:
        """Async on the event loop; the synchronous pipeline runs in a thread under a one-slot CapacityLimiter
        per worker process: the pipeline is CPU-bound Python, so several request threads of one worker only
        contend for its GIL (tail latency); concurrency comes from the workers (one per core)."""
        import anyio

        limiter = self._limiter
        if limiter is None:  # created on the worker's event loop, on first use
            limiter = self._limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(self._personalize_sync, body, limiter=limiter)

    def _personalize_sync(self, body: PersonalizeRequest) -> Response:
        from starlette.responses import JSONResponse, Response

        from serving.pipeline import personalize

        from serving.experiments import CHAMPION_ARM, INTERLEAVE, INTERLEAVE_ARM, assign

        request = body.model_dump(exclude_none=True)
        arm = CHAMPION_ARM
        experiment = self.experiment
        try:
            champion, challenger = self.bundle, self.challenger
            arm = assign(experiment, body.user_id) if challenger is not None else CHAMPION_ARM
            bundle = challenger if arm != CHAMPION_ARM else champion
            if experiment is not None and arm != CHAMPION_ARM and experiment.mode == INTERLEAVE:
                arm = INTERLEAVE_ARM
                answer = self._interleaved(request, champion, challenger, experiment.name)
            else:
                # serialized here: skips BentoML's pydantic pass over the output (~1 ms per request)
                impressions = self.impressions
                log_arm: Callable[[dict], None] | None = None
                if impressions is not None:
                    def log_arm(rec: dict, arm: str = arm) -> None:
                        impressions({**rec, "experiment": getattr(experiment, "name", None), "arm": arm})
                answer = personalize(request, bundle, self.store, rerank=self.serve.rerank,
                                     stale_max_age_s=self.serve.stale_max_age_s, log_impression=log_arm)
            if experiment is not None:
                answer["experiment"] = {"name": experiment.name, "arm": arm}
            if self.shadow and challenger is not None and arm == CHAMPION_ARM:
                self._shadow_pool.submit(self._shadow_score, request, challenger, answer["request_id"])
            self._observe(answer)
            return Response(dumps(answer), media_type="application/json")
        except ValueError as exc:
            return JSONResponse({"error": "invalid request", "detail": str(exc)}, status_code=400)
        except Exception as exc:  # noqa: BLE001 - a bug must still not turn into a 5xx for the caller
            log.exception("unexpected error in personalize")
            bundle = self.bundle
            n = body.request_config.num_results
            ranked = bundle.popular(n) if bundle is not None else (self.store.last_popular() if self.store else [])
            answer = {"request_id": uuid.uuid4().hex, "user_id": body.user_id,
                      "ranked_items": [{"item_id": i, "score": round(1.0 / (k + 1), 6), "rank": k + 1} for k, i in enumerate(ranked[:n])],
                      "model_version": getattr(bundle, "model_version", None), "served_by": "popularity_fallback:internal_error",
                      "latency_breakdown_ms": {"feature_fetch": 0.0, "candidate_retrieval": 0.0, "ranking_inference": 0.0,
                                               "post_processing": 0.0, "total": 0.0}, "error": type(exc).__name__}
            self._log_error(answer, request, experiment, arm)
            return Response(dumps(answer), media_type="application/json")

    def _log_error(self, answer: dict, request: dict, experiment, arm: str) -> None:
        """An internal error counts against its arm in the impression log (the canary's error guardrail)."""
        if self.impressions is None:
            return
        try:
            from serving.impressions import impression_record

            ctx = request.get("context") or {}
            rec = impression_record(answer, {"user_id": request.get("user_id"), "session_id": ctx.get("session_id"),
                                             "device_type": ctx.get("device_type")}, int(time.time() * 1000), None)
            self.impressions({**rec, "experiment": getattr(experiment, "name", None), "arm": arm})
        except Exception as exc:  # noqa: BLE001
            log.debug("error impression not logged: %s", exc)

    def _interleaved(self, request: dict, champion, challenger, experiment_name: str) -> dict:
        """Team-draft interleaving of both models' answers; the impression log records each slot's team."""
        from serving.interleaving import TEAM_A, TEAM_B, interleave_answers
        from serving.pipeline import personalize
        from serving.rerank import request_rng

        records: dict[str, dict] = {}
        rerank, stale_max_age_s = self.serve.rerank, self.serve.stale_max_age_s
        a = personalize(request, champion, self.store, log_impression=lambda r: records.__setitem__(TEAM_A, r),
                        rerank=rerank, stale_max_age_s=stale_max_age_s)
        b = personalize(request, challenger, self.store, request_id=a["request_id"], rerank=rerank,
                        stale_max_age_s=stale_max_age_s, log_impression=lambda r: records.__setitem__(TEAM_B, r))
        n = int((request.get("request_config") or {}).get("num_results", 10))
        answer, record = interleave_answers(a, b, n, request_rng(a["request_id"] + ":interleave"),
                                            records.get(TEAM_A), records.get(TEAM_B))
        if self.impressions is not None and record is not None:
            self.impressions({**record, "experiment": experiment_name, "arm": "interleave"})
        return answer

    def _shadow_score(self, request: dict, challenger, request_id: str) -> None:
        """Score the same request with the challenger and log it flagged `shadow` (never shown)."""
        from serving.pipeline import personalize

        impressions = self.impressions
        try:
            personalize(request, challenger, self.store, request_id=f"{request_id}:shadow", rerank=self.serve.rerank,
                        stale_max_age_s=self.serve.stale_max_age_s,
                        log_impression=None if impressions is None else
                        (lambda rec: impressions({**rec, "shadow": True, "arm": "challenger"})))
        except Exception as exc:  # noqa: BLE001 - shadow traffic must never disturb serving
            log.debug("shadow scoring failed: %s", exc)

    def _observe(self, answer: dict) -> None:
        if self.metrics is None:
            return
        try:
            hits, misses = (self.store.table_hits, self.store.table_loads) if self.store is not None else (0, 0)
            seen_hits, seen_misses = self._cache_seen
            self._cache_seen = (hits, misses)
            self.metrics.observe(answer, hits - seen_hits, misses - seen_misses)
        except Exception as exc:  # noqa: BLE001
            log.debug("metrics not recorded: %s", exc)

    def _start_stream_metrics(self) -> None:
        self.stream_metrics: StreamMetrics | None = None
        if self.store is None:
            return
        try:
            self.stream_metrics = StreamMetrics(self.store.client)
            threading.Thread(target=self.stream_metrics.run, name="kairos-stream-metrics", daemon=True,
                             args=(self._stop, self.serve.stream_metrics_s)).start()
        except Exception as exc:  # noqa: BLE001
            log.warning("stream lag metrics unavailable: %s", exc)

    @bentoml.api(route="/v1/events", output_spec=EventsResponse)
    def events(self, body: EventsRequest, /) -> Response:
        """Event intake: valid events go to the Redis stream the streaming job reads, invalid ones to the
        quarantine stream; the answer lists accepted ids and per-event errors. A backlog past
        KAIROS_STREAM_MAX_BACKLOG is a 429 with Retry-After: nothing was accepted, retry the batch."""
        from starlette.responses import JSONResponse, Response

        from streaming.intake import IntakeUnavailable, intake
        from streaming.retention import Backpressure

        if self.store is None:
            return JSONResponse({"error": "event intake unavailable", "detail": "no Redis configured"}, status_code=503)
        try:
            answer = intake(self.intake_client, list(body.events), max_backlog=self.serve.max_backlog)
        except Backpressure as exc:
            return JSONResponse({"error": "backpressure", "detail": str(exc), "retry_after_s": exc.retry_after_s,
                                 "backlog": exc.backlog, "limit": exc.limit}, status_code=429,
                                headers={"Retry-After": str(exc.retry_after_s)})
        except IntakeUnavailable as exc:  # "nothing was written" only when Redis said so (see streaming/intake.py)
            log.warning("event intake failed: %s", exc)
            return JSONResponse({"error": "event intake unavailable", "detail": str(exc),
                                 "written": exc.written}, status_code=503, headers={"Retry-After": "1"})
        except Exception as exc:  # noqa: BLE001 - Redis refused before writing (e.g. down at the backlog check)
            log.warning("event intake failed before writing: %s: %s", type(exc).__name__, exc)
            return JSONResponse({"error": "event intake unavailable", "written": False,
                                 "detail": f"{type(exc).__name__}: {exc}; nothing was written, retry the batch"},
                                status_code=503, headers={"Retry-After": "1"})
        if not answer["accepted"]:  # every event refused: the client's error, each one named with its field
            return JSONResponse({"error": "invalid events", "detail": [
                {"loc": ["events", e["index"], e["field"]], "msg": e["reason"], "type": "event_contract"}
                for e in answer["errors"]], **answer}, status_code=400)
        return Response(dumps(answer), media_type="application/json")

    @bentoml.api(route="/v1/status", output_spec=StatusResponse)
    def status(self) -> Response:
        from starlette.responses import Response

        redis_ok = False
        version = None
        if self.store is not None:
            try:
                version = self.store.current_version()
                redis_ok = True
            except Exception:  # noqa: BLE001
                redis_ok = False
        plan = self.plan
        status = {"model_version": getattr(self.bundle, "model_version", None), "feature_version": version,
                  "ranker_scorer": getattr(self.bundle, "scorer_name", None), "worker_pid": os.getpid(),
                  "challenger_version": getattr(self.challenger, "model_version", None),
                  "rollout": None if plan is None else {"source": plan.source, "shadow": plan.shadow,
                                                        "candidate_alias": plan.candidate_alias,
                                                        "experiment": getattr(plan.experiment, "name", None),
                                                        "share": getattr(plan.experiment, "challenger_share", None)},
                  "redis_ok": redis_ok, "time_ms": int(time.time() * 1000),
                  "impressions": self.impressions.stats() if self.impressions is not None else None,
                  "stream": self._stream_status()}
        return Response(dumps(status), media_type="application/json")

    def _stream_status(self) -> dict | None:
        """Event-stream length, per-group lag and missing groups (also on /metrics as kairos_stream_*), with the
        stream_lag_sensor's verdict on them (`alert`, `reason`): what /v1/status and /readyz report."""
        from streaming.job import GROUP
        from streaming.retention import lag_decision

        metrics: StreamMetrics | None = getattr(self, "stream_metrics", None)
        if metrics is None:
            return None
        try:
            lag = metrics.refresh()
        except Exception as exc:  # noqa: BLE001
            return {"error": f"{type(exc).__name__}: {exc}", "alert": True,
                    "reason": "the stream's state could not be read"}
        alert, reason = lag_decision(lag, GROUP, max_lag_ms=self.serve.stream_lag.max_lag_ms,
                                     max_pending=self.serve.stream_lag.max_pending)
        return {**lag, "alert": alert, "reason": reason}


# bentoml.service replaced the class by a bentoml.Service; mypy does not apply class decorators (python/mypy#3135)
_SERVICE = cast("bentoml.Service[KairosRanker]", KairosRanker)
if SETTINGS.api_key:
    _SERVICE.add_asgi_middleware(ApiKeyMiddleware, key=SETTINGS.api_key)
_SERVICE.add_asgi_middleware(BodyLimitMiddleware, max_bytes=SETTINGS.max_body_bytes)
