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

import logging
import os
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, cast

import bentoml

from ground.settings import Settings, redis_client, redis_url_from_env
from serving.settings import ServeSettings
from serving.http_middleware import ApiKeyMiddleware, BodyLimitMiddleware, _install_client_error_filter, dumps
from serving.http_models import EventsRequest, EventsResponse, PersonalizeRequest, PersonalizeResponse, StatusResponse
from serving.model_slots import ModelSlots
from serving.http_metrics import (ServingMetrics, StreamMetrics, _label_metrics_by_route, _publish_400_as_sent,
                                  _readyz_reports_stream)

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


for _patch in (_install_client_error_filter, _label_metrics_by_route, _publish_400_as_sent, _readyz_reports_stream):
    try:
        _patch()
    except Exception as _exc:  # noqa: BLE001 - an aid; serving does not depend on it
        log.warning("%s not applied: %s", _patch.__name__, _exc)


@bentoml.service(name="kairos_ranker", workers=SETTINGS.worker_count, threads=SETTINGS.threads, traffic={"timeout": 30},
                 logging={"access": {"enabled": SETTINGS.access_log}})
class KairosRanker(ModelSlots):
    def __init__(self) -> None:
        try:
            import torch

            torch.set_num_threads(1)
        except Exception:  # noqa: BLE001
            pass
        from features.online import OnlineStore

        if SETTINGS.switch_interval_ms > 0:
            import sys

            sys.setswitchinterval(SETTINGS.switch_interval_ms / 1000)
        self._sampler = None
        if SETTINGS.profile_out:
            from serving.sampler import StackSampler

            self._sampler = StackSampler(SETTINGS.profile_out).start()
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

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.stop()
        if self.impressions is not None:
            self.impressions.close()

    def __is_ready__(self) -> bool:
        return bool(getattr(self, "_ready", False))

    # ------------------------------------------------------------------ routes
    # each route answers with a serialized Response (no pydantic pass over the output); output_spec publishes its schema
    @bentoml.api(route="/v1/personalize", output_spec=PersonalizeResponse)
    async def personalize(self, body: PersonalizeRequest, /) -> Response:
        """Async on the event loop. By default (KAIROS_PIPELINE_ON_LOOP=1) the synchronous pipeline runs right
        here, on the loop's thread: the pipeline is CPU-bound Python, so concurrency comes from the workers (one per
        core), and a worker busy with a request neither reads nor accepts until it answers, so new connections
        go to an idle worker more often (with the hand-off below one worker held every keep-alive connection in 8
        of 12 A/B load rows, on the loop in 2 of 12: the accept is still a race between the workers). KAIROS_PIPELINE_ON_LOOP=0: the pipeline runs in a thread under a
        one-slot CapacityLimiter per worker (request threads of one worker would only contend for its GIL)."""
        if self.serve.pipeline_on_loop:
            return self._personalize_sync(body)  # no slot to wait for: `wait` is 0
        import anyio

        limiter = self._limiter
        if limiter is None:  # created on the worker's event loop, on first use
            limiter = self._limiter = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(self._personalize_sync, body, time.perf_counter(), limiter=limiter)

    def _personalize_sync(self, body: PersonalizeRequest, arrived: float | None = None) -> Response:
        """The pipeline's answer; its `server-timing` header says how long the request `wait`ed for this
        worker's pipeline slot (from the handler's entry: the limiter's queue and the thread handoff; 0 when the
        pipeline runs on the loop, where a request waits before the handler, in the socket) and how long
        the `app` took (ms), so a client can tell a queue in front of a worker from a slow pipeline or a slow HTTP
        path (bench/open_loop.py reads it)."""
        started = time.perf_counter()
        response = self._answer(body)
        wait = 0.0 if arrived is None else (started - arrived) * 1000
        response.headers["server-timing"] = f"wait;dur={wait:.3f}, app;dur={(time.perf_counter() - started) * 1000:.3f}"
        return response

    def _answer(self, body: PersonalizeRequest) -> Response:
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
