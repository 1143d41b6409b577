"""The impression log: every response, with the features the ranker saw, to a Redis Stream.

DESIGN invariant 6: tomorrow's training data, off-policy evaluation and the
train/serve skew check all start here. A request thread only builds a small dict
and hands it to a queue; a background thread XADDs in pipelined batches, so
logging adds microseconds, not a Redis round trip, to the request. If Redis is
down or the queue is full the record is counted as dropped (`stats()`), never
raised into the request.

From the stream, the `impression_log` asset lands one row per shown item in the
Delta table `impression_log` (monitoring/skew.py reads it back).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
from typing import Any, Mapping

import pandas as pd
import pyarrow as pa

log = logging.getLogger("kairos.impressions")

IMPRESSION_STREAM = "kairos:impressions"
STREAM_MAXLEN = 1_000_000
IMPRESSION_COLUMNS: list[str] = ["stream_id", "request_id", "user_id", "session_id", "device_type", "request_ts",
                                 "model_version", "feature_version", "served_by", "item_id", "position", "score",
                                 "propensity", "features", "experiment", "arm", "shadow", "latency_ms", "team"]

# the Delta table's column types, explicit: a batch where a column is all null (no experiment yet, no
# interleaving team) must not fix that column's type to Null and refuse every later batch
IMPRESSION_SCHEMA = pa.schema([
    ("stream_id", pa.string()), ("request_id", pa.string()), ("user_id", pa.string()), ("session_id", pa.string()),
    ("device_type", pa.string()), ("request_ts", pa.int64()), ("model_version", pa.string()),
    ("feature_version", pa.string()), ("served_by", pa.string()), ("item_id", pa.string()), ("position", pa.int64()),
    ("score", pa.float64()), ("propensity", pa.float64()), ("features", pa.string()), ("experiment", pa.string()),
    ("arm", pa.string()), ("shadow", pa.bool_()), ("latency_ms", pa.float64()), ("team", pa.string()),
    ("batch_id", pa.string()),
])


def impression_record(response: Mapping[str, Any], request: Mapping[str, Any], now_ms: int,
                      features: Mapping[str, Mapping[str, float]] | None) -> dict[str, Any]:
    """What one response showed and why: items, positions, scores, propensities, and their feature values."""
    items = [{"item_id": it["item_id"], "position": int(it["rank"]) - 1, "score": float(it["score"]),
              # a deterministic policy shows its top-k with probability 1 (exploration will log < 1)
              "propensity": float(it.get("propensity", 1.0)),
              **({"team": it["team"]} if it.get("team") else {})} for it in response.get("ranked_items", [])]
    return {
        "request_id": response.get("request_id"), "user_id": request.get("user_id"),
        "session_id": request.get("session_id"), "device_type": request.get("device_type"), "request_ts": int(now_ms),
        "model_version": None if response.get("model_version") is None else str(response.get("model_version")),
        "feature_version": response.get("feature_version"), "served_by": response.get("served_by"),
        "items": items, "features": dict(features or {}),
        "experiment": (response.get("experiment") or {}).get("name"), "arm": (response.get("experiment") or {}).get("arm"),
        "shadow": bool(response.get("shadow", False)),
        # per-request server-side latency (the pipeline's total), per arm: the canary's p99 guardrail
        "latency_ms": (response.get("latency_breakdown_ms") or {}).get("total"),
    }


try:  # the writer thread shares the request threads' interpreter: encode in C (orjson), not in Python
    import orjson

    def _dumps(record: Mapping[str, Any]) -> bytes:
        return orjson.dumps(record, default=str, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
except ImportError:  # pragma: no cover - orjson is pinned in requirements.lock
    def _dumps(record: Mapping[str, Any]) -> bytes:
        return json.dumps(record, separators=(",", ":")).encode()


class ImpressionLogger:
    """Asynchronous XADD of impression records (bounded queue, batched pipeline, counted drops)."""

    def __init__(self, client: Any, stream: str = IMPRESSION_STREAM, max_queue: int = 10_000, batch: int = 256) -> None:
        self.client = client
        self.stream = stream
        self.batch = batch
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self.logged = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="kairos-impressions", daemon=True)
        self._thread.start()

    def __call__(self, record: Mapping[str, Any]) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while not self._stop.is_set() or not self._queue.empty():
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            records = [first]
            while len(records) < self.batch:
                try:
                    records.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                pipe = self.client.pipeline(transaction=False)
                for r in records:
                    pipe.xadd(self.stream, {"record": _dumps(r)}, maxlen=STREAM_MAXLEN, approximate=True)
                pipe.execute()
                self.logged += len(records)
            except Exception as exc:  # noqa: BLE001 - Redis down: count, never raise into serving
                self.dropped += len(records)
                log.warning("impression log: %d records dropped (%s: %s)", len(records), type(exc).__name__, exc)

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until everything queued so far is written (tests, shutdown)."""
        import time

        deadline = time.time() + timeout_s
        while not self._queue.empty() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.06)

    def close(self) -> None:
        self.flush()
        self._stop.set()
        self._thread.join(timeout=2)

    def stats(self) -> dict[str, int]:
        return {"logged": self.logged, "dropped": self.dropped, "queued": self._queue.qsize()}


def read_impressions(client: Any, after_id: str = "0-0", count: int = 100_000,
                     stream: str = IMPRESSION_STREAM) -> tuple[pd.DataFrame, str]:
    """Stream entries after `after_id` flattened to one row per shown item (IMPRESSION_COLUMNS); the last id read."""
    start = "(" + after_id if after_id != "0-0" else "-"
    entries = client.xrange(stream, min=start, max="+", count=count)
    rows: list[dict[str, Any]] = []
    last = after_id
    for entry_id, fields in entries:
        entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        raw = fields.get("record") or fields.get(b"record")
        record = json.loads(raw)
        last = entry_id
        feats = record.get("features") or {}
        for it in record.get("items", []):
            rows.append({
                "stream_id": entry_id, "request_id": record.get("request_id"), "user_id": record.get("user_id"),
                "session_id": record.get("session_id"), "device_type": record.get("device_type"),
                "request_ts": int(record.get("request_ts") or 0), "model_version": record.get("model_version"),
                "feature_version": record.get("feature_version"), "served_by": record.get("served_by"),
                "item_id": it["item_id"], "position": int(it["position"]), "score": float(it["score"]),
                "propensity": float(it["propensity"]),
                "features": json.dumps(feats.get(it["item_id"])) if it["item_id"] in feats else None,
                "experiment": record.get("experiment"), "arm": record.get("arm"),
                "shadow": bool(record.get("shadow", False)),
                "latency_ms": None if record.get("latency_ms") is None else float(record["latency_ms"]),
                "team": it.get("team"),
            })
    frame = pd.DataFrame(rows, columns=IMPRESSION_COLUMNS)
    return frame, last


__all__ = ["IMPRESSION_COLUMNS", "IMPRESSION_SCHEMA", "IMPRESSION_STREAM", "ImpressionLogger", "impression_record", "read_impressions"]
