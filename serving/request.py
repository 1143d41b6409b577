"""The ranking request, one rule for both doors (DESIGN "The ranking request").

The HTTP schema (serving.service's pydantic models, what OpenAPI publishes and BentoML checks first) is built
from these constants, and `validate_request` -- which every request passes, over HTTP or in process (bench,
replay, tests) -- enforces all of them and fills the defaults. Light on purpose: no numpy, pandas or Redis.
"""
from __future__ import annotations

from typing import Any, Mapping

DEFAULT_NUM_RESULTS = 10
MAX_NUM_RESULTS = 100
DEFAULT_POOL = 200
MAX_POOL = 1000
ID_MAX = 256  # = data_contracts.events.MAX_ID_LENGTH: ids are Redis keys; a megabyte id is refused
LABEL_MAX = 64  # surface, device_type, geo_region

TOP_LEVEL = {"user_id", "surface", "context", "request_config"}
CONTEXT_FIELDS = {"session_id", "device_type", "timestamp_ms", "geo_region"}
CONFIG_FIELDS = {"num_results", "candidate_pool_size", "max_latency_ms"}


def _str_field(value: Any, name: str, max_len: int) -> str | None:
    """None stays None; anything else must be a string of at most `max_len` characters."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    if len(value) > max_len:
        raise ValueError(f"{name} must be at most {max_len} characters, got {len(value)}")
    return value


def _int_field(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"{name} must be an integer between {lo} and {hi}, got {value!r}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def validate_request(request: Any) -> dict[str, Any]:
    """The request with defaults filled in; ValueError with a clear message if it is malformed."""
    if not isinstance(request, Mapping):
        raise ValueError("request body must be a JSON object")
    unknown = set(request) - TOP_LEVEL
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(TOP_LEVEL)}")
    user_id = request.get("user_id")
    if not isinstance(user_id, str) or not user_id.strip():
        raise ValueError("user_id is required (a non-empty string)")
    _str_field(user_id, "user_id", ID_MAX)
    surface = _str_field(request.get("surface", "home_feed"), "surface", LABEL_MAX)
    context = request.get("context") or {}
    if not isinstance(context, Mapping):
        raise ValueError("context must be an object")
    unknown = set(context) - CONTEXT_FIELDS
    if unknown:
        raise ValueError(f"unknown context field(s) {sorted(unknown)}; allowed: {sorted(CONTEXT_FIELDS)}")
    session_id = _str_field(context.get("session_id"), "context.session_id", ID_MAX)
    device_type = _str_field(context.get("device_type") or "mobile", "context.device_type", LABEL_MAX)
    ts = context.get("timestamp_ms")
    if ts is not None:
        ts = _int_field(ts, "context.timestamp_ms", 0, 2**62)
    geo = _str_field(context.get("geo_region"), "context.geo_region", LABEL_MAX)
    config = request.get("request_config") or {}
    if not isinstance(config, Mapping):
        raise ValueError("request_config must be an object")
    unknown = set(config) - CONFIG_FIELDS
    if unknown:
        raise ValueError(f"unknown request_config field(s) {sorted(unknown)}; allowed: {sorted(CONFIG_FIELDS)}")
    num = config.get("num_results", DEFAULT_NUM_RESULTS)
    num = _int_field(num, "request_config.num_results", 1, MAX_NUM_RESULTS)
    pool = config.get("candidate_pool_size", DEFAULT_POOL)
    pool = _int_field(pool, "request_config.candidate_pool_size", 1, MAX_POOL)
    max_latency = config.get("max_latency_ms")
    if max_latency is not None and (isinstance(max_latency, bool) or not isinstance(max_latency, (int, float)) or max_latency <= 0):
        raise ValueError(f"request_config.max_latency_ms must be a positive number, got {max_latency!r}")
    return {"user_id": user_id, "surface": surface or "home_feed", "session_id": session_id or None,
            "device_type": device_type, "timestamp_ms": ts, "geo_region": geo,
            "num_results": num, "candidate_pool_size": max(pool, num), "max_latency_ms": max_latency}
