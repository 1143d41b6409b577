"""The HTTP contract of the ranking server: the pydantic request and answer models (what OpenAPI publishes and
BentoML checks first), with their Swagger examples.

The request body, exactly (DESIGN "The ranking request"); unknown fields are refused. BentoML validates the body
against these models before the handler runs and answers 400 with the failing field's location (e.g.
["request_config", "num_results"]) on any violation. The limits are serving.request's (ID_MAX, LABEL_MAX,
MAX_NUM_RESULTS, ...), and its validate_request, which every request also passes (in serving.pipeline.personalize),
enforces the same ones for in-process callers (and refuses a blank user_id).
"""
from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from serving.request import DEFAULT_NUM_RESULTS, DEFAULT_POOL, ID_MAX, LABEL_MAX, MAX_NUM_RESULTS, MAX_POOL


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
