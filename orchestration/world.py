"""One world config for `kairos demo`: source, mapping, split, labels, gate, serving -> Dagster run config.

```yaml
source: file                       # simulator | movielens-100k | movielens-1m | movielens-latest | file
path: data/clicks.csv              # the log (file) or the data set's folder (movielens-*)
arrival: export                    # export: the log arrives as one ingest batch (default); event: one per day
mapping: {user: user_id, item: item_id, timestamp: eventdate, timestamp_unit: iso,
          timestamp_offset: timeframe, session: session_id, delimiter: ";"}
catalog: {path: data/products.csv, mapping: {item: itemId, categories: category}}   # optional
users: {path: data/users.csv, mapping: {user: id, segment: plan}}                  # optional
simulator: {n_users: 300, n_items: 400, days: 14, seed: 7}                          # source: simulator
split: {validation_days: 14, test_days: 28, gap_hours: 0}   # or test_quantile: 0.8; default: derived from the data
labels: {attribution_window_hours: 72, easy_negative_ratio: 4}   # default: the log kind's rule
gate: {min_ndcg_lift_over_popularity: 0.0}                  # validation_gate config
serving: {num_results: 10, candidate_pool_size: 200, max_latency_ms: 100}
ops: {two_tower_model: {config: {epochs: 5}}}               # any other asset config, passed through
```

`resolve_world` reads the source once (pandas, no Spark), derives what the data decides — the first
daily partition (a historical log arrives on the day of its last event unless `arrival: event`), the validation/test windows (the last ~10% and the ~10% before it of the impressions,
whole days, at least `MIN_WINDOW_DAYS`), the label rule of the log kind — and checks the world is
trainable (positive labels, enough impressions per window) before any heavy step, with errors that
say what to change.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from data_contracts.schema import DAY_MS

WORLD_KEYS: tuple[str, ...] = ("source", "path", "arrival", "mapping", "catalog", "users", "simulator", "split", "labels", "gate",
                               "serving", "ops")
SIMULATOR_KEYS: tuple[str, ...] = ("n_users", "n_items", "n_categories", "days", "seed", "shift_day")
TEST_SHARE = 0.10        # of impressions in the test window
VALIDATION_SHARE = 0.10  # of impressions in the validation window
MIN_WINDOW_DAYS = 1.0
MIN_WINDOW_IMPRESSIONS = 50
# MovieLens-100K, months of sparse public ratings: the test window is the last 20% of the labeled rows (the catalog evaluation's
# global temporal split, the one bench/quality.py and the README's quality figures use), validation the two weeks
# before it. One definition: `kairos demo` (resolve_world) and materialize_all's default both read it.
MOVIELENS_SPLIT: dict[str, float] = {"validation_days": 14.0, "test_quantile": 0.8, "gap_hours": 0.0}
SPLIT_KEYS = frozenset({"validation_days", "test_days", "test_quantile", "gap_hours"})  # TrainingSetConfig's
KNOWN_SPLITS: dict[str, dict[str, float]] = {"movielens-100k": MOVIELENS_SPLIT}
SERVING_DEFAULTS: dict[str, Any] = {"num_results": 10, "candidate_pool_size": 200, "max_latency_ms": 100}


class WorldError(ValueError):
    """The world config or its data cannot make a trainable world; the message says what to change."""


@dataclass
class World:
    """What `kairos demo` runs: the source config, the build job's run config and the demo requests' shape."""

    source: dict[str, Any]
    ops: dict[str, Any]
    serving: dict[str, Any]
    partition_start: str
    log_kind: str
    summary: dict[str, Any] = field(default_factory=dict)
    partition_end: str | None = None  # the last ingest day: a historical world's daily partitions end there

    def describe(self) -> str:
        s = self.summary
        return (f"world: source={self.source['source']} ({self.log_kind} log, label rule {s.get('label_rule')}): "
                f"{s.get('events')} events, {s.get('users')} users, {s.get('items')} items, "
                f"{s.get('first_day')}..{s.get('last_day')} ({s.get('span_days')} days), arriving in "
                f"{s.get('ingest_days')} daily partition(s) {self.partition_start}..{self.partition_end or 'today'}; split validation {s.get('validation_days')} d + test {s.get('test_window')} "
                f"({s.get('split_origin')}): impressions train/validation/test {s.get('train_impressions')}/"
                f"{s.get('validation_impressions')}/{s.get('test_impressions')}; "
                f"{s.get('positive_labels')} positive labels")


def load_world_file(path: Path | str) -> dict[str, Any]:
    """The YAML (or JSON) world file as a dict; unknown keys are errors naming the allowed ones."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise WorldError(f"{path} does not exist: pass --config a YAML world file (see orchestration/world.py)")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise WorldError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(spec, dict):
        raise WorldError(f"{path}: a world file is a mapping with keys {list(WORLD_KEYS)}")
    unknown = sorted(set(spec) - set(WORLD_KEYS))
    if unknown:
        raise WorldError(f"{path}: unknown key(s) {unknown}; allowed keys are {list(WORLD_KEYS)}")
    base = path.resolve().parent
    for key in ("path",):  # relative paths are relative to the world file
        if spec.get(key):
            spec[key] = str((base / spec[key]).resolve())
    for section in ("catalog", "users"):
        if isinstance(spec.get(section), dict) and spec[section].get("path"):
            spec[section]["path"] = str((base / spec[section]["path"]).resolve())
    return spec


def _as_json(value: Any, what: str) -> str:
    if value in (None, "", {}):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    raise WorldError(f"{what} must be a mapping (or a JSON object string), got {type(value).__name__}")


def source_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The `SourceConfig` dict (bronze_events / catalog config) of a world spec."""
    from ingestion.sources import SOURCES

    source = spec.get("source") or "simulator"
    if source not in SOURCES:
        raise WorldError(f"unknown source {source!r}; use one of {list(SOURCES)}")
    if source == "simulator":
        sim = spec.get("simulator") or {}
        unknown = sorted(set(sim) - set(SIMULATOR_KEYS))
        if unknown:
            raise WorldError(f"unknown simulator key(s) {unknown}; allowed keys are {list(SIMULATOR_KEYS)}")
        return {"source": "simulator", **{k: v for k, v in sim.items()}}
    if not spec.get("path"):
        what = "the log file (CSV/TSV/Parquet)" if source == "file" else "the MovieLens folder"
        raise WorldError(f"source {source!r} needs `path`: {what} (CLI --path)")
    config: dict[str, Any] = {"source": source, "path": str(Path(spec["path"]).resolve())}
    if spec.get("arrival"):
        config["arrival"] = spec["arrival"]
    if source == "file":
        config["mapping_json"] = _as_json(spec.get("mapping"), "mapping")
        if not config["mapping_json"]:
            raise WorldError('source "file" needs `mapping` (CLI --mapping): which column is the user, the item and '
                             'the time, e.g. {"user": "uid", "item": "sku", "timestamp": "ts"}')
    for section, path_key, mapping_key in (("catalog", "catalog_path", "catalog_mapping_json"),
                                           ("users", "users_path", "users_mapping_json")):
        part = spec.get(section)
        if part:
            if not isinstance(part, dict) or not part.get("path"):
                raise WorldError(f"`{section}` needs `path` (and optionally `mapping`), got {part!r}")
            if source != "file":
                raise WorldError(f"`{section}` files join a generic log (source: file); {source} brings its own")
            config[path_key] = str(Path(part["path"]).resolve())
            config[mapping_key] = _as_json(part.get("mapping"), f"{section}.mapping")
    return config


def derive_split(impression_ts: np.ndarray) -> dict[str, float]:
    """Validation/test windows from the data: whole days holding the last TEST_SHARE and the
    VALIDATION_SHARE before it of the impressions, at least MIN_WINDOW_DAYS each."""
    ts = np.sort(np.asarray(impression_ts, dtype="int64"))
    end = int(ts[-1]) + 1
    test_start = int(np.quantile(ts, 1 - TEST_SHARE))
    test_days = max(MIN_WINDOW_DAYS, float(math.ceil((end - test_start) / DAY_MS)))
    valid_from = int(np.quantile(ts, 1 - TEST_SHARE - VALIDATION_SHARE))
    valid_days = max(MIN_WINDOW_DAYS, float(math.ceil((end - test_days * DAY_MS - valid_from) / DAY_MS)))
    return {"validation_days": valid_days, "test_days": test_days, "gap_hours": 0.0}


def _window_counts(impression_ts: np.ndarray, split: Mapping[str, Any]) -> tuple[int, int, int]:
    """(train, validation, test) labeled rows under the training_set asset's own split rule."""
    from training.dataset import SplitConfig, split_boundaries

    ts = np.asarray(impression_ts, dtype="int64")
    b = split_boundaries(int(ts.max()), SplitConfig(**split), timestamps=ts)
    valid_start, test_start = b.validation_start_ms, b.test_start_ms
    return int((ts < valid_start).sum()), int(((ts >= valid_start) & (ts < test_start)).sum()), int((ts >= test_start).sum())


def resolve_world(spec: dict[str, Any]) -> World:
    """Read the source once and derive partitions, split and labels; fail here if it cannot train."""
    from ingestion.labels import LabelConfig, build_labels, untrainable_reason
    from ingestion.refine import event_dates
    from ingestion.sources import LABEL_RULES, load_source_frames, log_kind

    config = source_config(spec)
    events, items, users = load_source_frames(config)
    if events.empty:
        raise WorldError(f"the source {config['source']} holds no events")
    kind = log_kind(config, events)
    ts = pd.to_numeric(events["timestamp"], errors="coerce").dropna().astype("int64").to_numpy()
    arrived = events["received_at"].to_numpy(dtype="int64")
    partition_start = str(event_dates(np.array([arrived.min()]))[0])
    partition_end = str(event_dates(np.array([arrived.max()]))[0])
    first_day = str(event_dates(np.array([ts.min()]))[0])
    last_day = str(event_dates(np.array([ts.max()]))[0])

    labels_cfg = {**LABEL_RULES[kind], **(spec.get("labels") or {})}
    window_h = float(labels_cfg.get("attribution_window_hours", 72.0))
    probe = build_labels(events, as_of_ms=int(ts.max()) + 1, config=LabelConfig(
        attribution_window_ms=int(window_h * 3_600_000),
        positive_threshold=float(labels_cfg.get("positive_threshold", 0.3)),
        click_is_positive=bool(labels_cfg.get("click_is_positive", False))))
    positives = int(probe["label_binary"].sum()) if len(probe) else 0
    if positives == 0:
        raise WorldError(f"this world cannot train: {untrainable_reason(events, probe, bool(labels_cfg.get('click_is_positive')))}")

    imp_ts = probe["timestamp"].to_numpy(dtype="int64")
    if spec.get("split"):
        split, origin = {"gap_hours": 0.0, **spec["split"]}, "world config"
        unknown = sorted(set(split) - SPLIT_KEYS)
        if unknown:
            raise WorldError(f"unknown split key(s) {unknown}; allowed keys are {sorted(SPLIT_KEYS)}")
    elif config["source"] in KNOWN_SPLITS:
        split, origin = dict(KNOWN_SPLITS[config["source"]]), f"{config['source']} default"
    elif config["source"] == "simulator":
        split, origin = {"validation_days": 2.0, "test_days": 2.0, "gap_hours": 0.0}, "simulator default"
    else:
        split, origin = derive_split(imp_ts), f"derived: last {TEST_SHARE:.0%} / {VALIDATION_SHARE:.0%} of impressions"
    n_train, n_valid, n_test = _window_counts(imp_ts, split)
    small = {name: n for name, n in (("train", n_train), ("validation", n_valid), ("test", n_test))
             if n < MIN_WINDOW_IMPRESSIONS}
    if small:
        raise WorldError(f"split {split} leaves too few labeled impressions in {small} (at least "
                         f"{MIN_WINDOW_IMPRESSIONS} each): the log spans {first_day}..{last_day}; widen the windows in "
                         "the world config `split` (validation_days, test_days) or import more data")

    ops: dict[str, Any] = {"training_set": {"config": split}, "labels": {"config": labels_cfg}}
    if spec.get("gate"):
        ops["validation_gate"] = {"config": dict(spec["gate"])}
    for name, op in (spec.get("ops") or {}).items():
        ops[name] = op
    serving = {**SERVING_DEFAULTS, **(spec.get("serving") or {})}
    unknown = sorted(set(serving) - set(SERVING_DEFAULTS))
    if unknown:
        raise WorldError(f"unknown serving key(s) {unknown}; allowed keys are {list(SERVING_DEFAULTS)}")
    span_days = (int(ts.max()) - int(ts.min())) / DAY_MS
    summary = {"events": len(events), "users": len(users), "items": len(items), "first_day": first_day,
               "last_day": last_day, "span_days": round(span_days, 1), "split_origin": origin,
               "validation_days": split["validation_days"], "test_days": split.get("test_days"),
               "test_window": (f"last {1 - split['test_quantile']:.0%} of labeled rows" if split.get("test_quantile")
                               else f"{split['test_days']} d"),
               "train_impressions": n_train, "validation_impressions": n_valid, "test_impressions": n_test,
               "positive_labels": positives,
               "label_rule": json.dumps({k: labels_cfg[k] for k in ("click_is_positive", "easy_negative_ratio")
                                         if k in labels_cfg}, sort_keys=True)}
    summary["ingest_days"] = len(np.unique(arrived // DAY_MS))
    return World(source=config, ops=ops, serving=serving, partition_start=partition_start, log_kind=kind,
                 summary=summary, partition_end=partition_end)


__all__ = ["World", "WorldError", "derive_split", "load_world_file", "resolve_world", "source_config"]
