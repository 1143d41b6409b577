"""The OpenAPI document of POST /v1/personalize: typed answer, real examples (what Swagger shows)."""
from __future__ import annotations

from serving.http_models import PersonalizeRequest, PersonalizeResponse
from serving.service import KairosRanker


def _spec() -> dict:
    return KairosRanker.openapi_spec.asdict()


def test_personalize_200_is_typed_with_real_examples() -> None:
    spec = _spec()
    op = spec["paths"]["/v1/personalize"]["post"]
    ok = op["responses"][200]["content"]["application/json"]["schema"]
    assert ok["properties"]["ranked_items"]["items"] == {"$ref": "#/components/schemas/RankedItem"}
    assert {"request_id", "ranked_items", "served_by", "latency_breakdown_ms"} <= set(ok["required"])
    assert ok["example"]["ranked_items"][0]["item_id"] == "i00217" and ok["example"]["served_by"] == "two_stage"
    components = spec["components"]["schemas"]
    assert set(components["LatencyBreakdown"]["required"]) == {"feature_fetch", "candidate_retrieval",
                                                               "ranking_inference", "post_processing", "total"}
    request = next(iter(op["requestBody"]["content"].values()))["schema"]
    request = components[request["$ref"].rsplit("/", 1)[-1]] if "$ref" in request else request
    assert request["example"]["user_id"] == "u00001" and request["example"]["context"]["timestamp_ms"] > 0
    # the examples are valid instances of their own models
    PersonalizeRequest.model_validate(request["example"])
    PersonalizeResponse.model_validate(ok["example"])


def test_a_real_fallback_answer_fits_the_response_model() -> None:
    from serving.pipeline import personalize

    answer = personalize({"user_id": "u1", "context": {"timestamp_ms": 1768000000000}}, None, None)
    parsed = PersonalizeResponse.model_validate(answer)
    assert parsed.served_by.startswith("popularity_fallback") and parsed.latency_breakdown_ms.total >= 0


def test_every_served_by_path_and_its_extra_fields_are_published() -> None:
    """A client reading the schema learns every serving path, and which fields name what was degraded."""
    from serving.pipeline import SERVED_NO_FEATURES, SERVED_STALE, SERVED_TWO_STAGE

    ok = _spec()["paths"]["/v1/personalize"]["post"]["responses"][200]["content"]["application/json"]["schema"]
    served_by = ok["properties"]["served_by"]["description"]
    assert all(path in served_by for path in (SERVED_TWO_STAGE, SERVED_NO_FEATURES, SERVED_STALE, "popularity_fallback"))
    assert {"missing_features", "stale_feature_age_s"} <= set(ok["properties"])
    PersonalizeResponse.model_validate({**ok["example"], "served_by": SERVED_NO_FEATURES,
                                        "missing_features": ["user", "item"]})
def test_events_and_status_answers_are_typed_with_real_examples(redis_client) -> None:
    """Swagger once showed `{additionalProp1: {}}` for these: both are models now, and what the real intake
    (a real redis-server) and the real stream-lag / impression counters return fits them."""
    from serving.impressions import ImpressionLogger
    from serving.http_models import EventsResponse, StatusResponse
    from streaming.intake import intake
    from streaming.job import STREAM
    from streaming.retention import stream_lag

    spec = _spec()
    components = spec["components"]["schemas"]
    for route, model in (("/v1/events", EventsResponse), ("/v1/status", StatusResponse)):
        ok = spec["paths"][route]["post"]["responses"][200]["content"]["application/json"]["schema"]
        ok = components[ok["$ref"].rsplit("/", 1)[-1]] if "$ref" in ok else ok
        assert ok.get("properties") and ok.get("required"), route  # a model, not `{additionalProp1: {}}`
        assert ok["example"] and "string" not in str(ok["example"].values()), route
        model.model_validate(ok["example"])
    now = 1768348800000
    event = {"event_id": "e-1", "user_id": "u00001", "item_id": "i00217", "event_type": "click", "timestamp": now,
             "session_id": "s1", "position": 0, "page_context": "home_feed", "device_type": "mobile",
             "dwell_time_ms": 0, "schema_version": 1}
    answer = intake(redis_client, [event, {**event, "event_id": "e-2", "device_type": "toaster"}], now_ms=now + 1000)
    parsed = EventsResponse.model_validate(answer)
    assert parsed.counts.accepted == 1 and parsed.errors[0].field == "device_type"
    assert parsed.errors[0].reason == EventsResponse.model_json_schema()["example"]["errors"][0]["reason"]
    logger = ImpressionLogger(redis_client)
    status = {"model_version": None, "feature_version": None, "ranker_scorer": None, "worker_pid": 1,
              "challenger_version": None, "rollout": None, "redis_ok": True, "time_ms": now,
              "impressions": logger.stats(),
              "stream": stream_lag(redis_client, STREAM)}
    logger.close()
    assert StatusResponse.model_validate(status).stream["length"] >= 1
