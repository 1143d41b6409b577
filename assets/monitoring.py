"""Monitoring assets: PSI drift (Evidently), feature health, served-model health, off-policy evaluation, and the
impression log with its train/serve skew check.

Every asset reads pinned Delta versions and Redis through resources and hands frames to the pure functions in
monitoring/ (drift, health, ope, skew); thresholds are Dagster `Config`.
"""

import math
from typing import TYPE_CHECKING, Any

import pandas as pd
from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, Config,
                     MaterializeResult, MetadataValue, asset)

from assets.features import ITEM_FEATURES, TRAINING_SET, USER_FEATURES
from assets.ingestion import ITEMS, SILVER
from assets.serving import ONLINE_FEATURES
from compliance.versions import source_version
from training.dataset import read_training_set, stored_columns
from data_contracts.schema import DAY_MS, HOUR_MS
from ingestion.labels import LabelConfig
from monitoring.drift import DriftThresholds
from assets.config import Knob, dataclass_config, to_dataclass
from assets.resources import ArtifactsResource, LakeResource, MlflowResource, RedisResource

FEATURE_DRIFT = "feature_drift"
IMPRESSION_LOG = "impression_log"
FEATURE_HEALTH = "feature_health"
SERVED_MODEL_HEALTH = "served_model_health"
OFF_POLICY_EVALUATION = "off_policy_evaluation"
# what monitoring.drift.served_feature_window reads from the impression log
SERVED_FEATURE_COLUMNS = ["request_ts", "features", "shadow", "served_by"]


# DriftThresholds' warn / act PSI, plus the asset's windows. min_sessions: per behaviour window, fewer gives status
# insufficient_data (never a retrain). Ranker features: the serving window is the impression log's last recent_days
# when it holds at least min_served_rows shown two-stage rows, else the training set's newest recent_days (no
# traffic yet); max_reference_rows: a seeded sample of the train split (PSI bins need thousands, not millions).
# ranker_psi_drives_status is off by default: on short or young histories windowed counts (30d impressions...) trend
# while their windows fill, and user-level features are clustered by user, so their PSI is loud without a real
# shift (README: measured figures); the behaviour PSI is what the sensor acts on unless this is set
if TYPE_CHECKING:
    DriftConfig = Any
else:
    DriftConfig = dataclass_config("DriftConfig", DriftThresholds, (
        Knob("recent_days", None, type=float, default=2.0), Knob("min_sessions", None, type=int, default=300),
        Knob("warn_psi", "warn"), Knob("act_psi", "act"),
        Knob("min_served_rows", None, type=int, default=200), Knob("max_reference_rows", None, type=int, default=50_000),
        Knob("ranker_psi_drives_status", None, type=bool, default=False), Knob("seed", None, type=int, default=7),
    ), __name__)


def _feature_rows(store, version: int, features: list[str] | None = None,
                  filters: list[tuple] | None = None) -> pd.DataFrame:
    """The training set's split, clock, event id and the raw columns of `features` (default: every registered
    one), rows matching `filters`: what drift and health read. Features computed over these columns equal them
    computed over every column, and the history / co-item list columns no feature reads are not decoded."""
    from features.registry import feature_input_columns

    columns = stored_columns(store, TRAINING_SET, version, ["split", "timestamp", "event_id",
                                                             *feature_input_columns(features)])
    return read_training_set(store, TRAINING_SET, version, columns=columns, filters=filters)


def _ranker_windows(store, config: DriftConfig, frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(reference, current, current source) frames of ranker features: the train split vs the serving window."""
    from features.functions import assemble_features
    from monitoring.drift import served_feature_window

    train = frame[frame["split"] == "train"]
    if len(train) > config.max_reference_rows:
        train = train.sample(config.max_reference_rows, random_state=config.seed)
    reference = assemble_features(train)
    current, source = pd.DataFrame(), "training_set"
    if store.exists(IMPRESSION_LOG):
        current = served_feature_window(store.read(IMPRESSION_LOG, columns=SERVED_FEATURE_COLUMNS), config.recent_days)
        source = "impression_log"
    if len(current) < config.min_served_rows:
        recent = frame[frame["timestamp"] > int(frame["timestamp"].max()) - int(config.recent_days * DAY_MS)]
        current, source = assemble_features(recent), "training_set"
    return reference, current, source


@asset(deps=[SILVER, ITEMS, TRAINING_SET, IMPRESSION_LOG], group_name="monitoring",
       code_version=source_version(__file__, "monitoring/drift.py"),
       description="PSI per behavioural feature (last days of events vs the training window) and per ranker feature "
                   "(served features vs the training split), with Evidently HTML reports; status drives retraining.")
def feature_drift(context: AssetExecutionContext, config: DriftConfig, lake: LakeResource,
                  artifacts: ArtifactsResource) -> MaterializeResult:
    from monitoring.drift import (BEHAVIOUR_EVENT_COLUMNS, CYCLICAL_FEATURES, behaviour_windows, drift_report,
                                  event_drift_frame, feature_statuses, ranker_feature_drift)

    store = lake.lake()
    pins = {t: store.pin(t) for t in (SILVER, ITEMS, TRAINING_SET)}
    events = store.read(SILVER, version=pins[SILVER].version, columns=BEHAVIOUR_EVENT_COLUMNS)
    items = store.read(ITEMS, version=pins[ITEMS].version)
    rows = _feature_rows(store, pins[TRAINING_SET].version)
    train_ts = rows.loc[rows["split"] == "train", "timestamp"]
    # whole, closed sessions by their start, cut to whole UTC days (a partial last day holds only its first
    # hours: the hour of day would read as drift); too few sessions: insufficient_data, never a retrain
    windows = behaviour_windows(events, int(train_ts.min()), int(train_ts.max()), config.recent_days,
                                config.min_sessions)
    for note in windows.notes:
        context.log.warning(f"feature_drift: {note}")
    reference = event_drift_frame(windows.reference, items)
    current = event_drift_frame(windows.current, items)
    columns = [c for c in reference.columns if c in current.columns and c not in ("session_id", "user_id")]
    deciding = columns if windows.aligned else [c for c in columns if c not in CYCLICAL_FEATURES]
    reports = artifacts.path("reports", context.run_id)
    html = reports / "drift.html"
    thresholds = to_dataclass(config, DriftThresholds)
    result = drift_report(reference, current, columns, html_path=html, thresholds=thresholds,
                          status_columns=deciding, min_rows=config.min_sessions)
    result.notes[:0] = windows.notes
    # the ranker's own features: what the model was trained on vs what it is scoring now
    ref_f, cur_f, source = _ranker_windows(store, config, rows)
    ranker_html = reports / "ranker_feature_drift.html"
    ranker = ranker_feature_drift(ref_f, cur_f, html_path=ranker_html, thresholds=thresholds)
    status, max_psi = result.status, float(result.max_psi)
    if config.ranker_psi_drives_status and ranker.max_psi > max_psi:
        status, max_psi = ranker.status, float(ranker.max_psi)
    context.log.info(f"drift status {status}: behaviour max PSI {result.max_psi:.3f} ({result.status}), ranker "
                     f"features max PSI {ranker.max_psi:.3f} ({ranker.status}, {len(cur_f)} rows from {source})")
    return MaterializeResult(metadata={
        **result.as_metadata(), "status": status, "max_psi": max_psi,
        "behaviour_status": result.status, "behaviour_max_psi": float(result.max_psi),
        "psi": MetadataValue.json(result.psi), "report": MetadataValue.path(str(html)),
        "report_url": artifacts.publish_report(html, context.run_id),
        "ranker_status": ranker.status, "ranker_max_psi": float(ranker.max_psi),
        "ranker_drifted_features": ",".join(ranker.drifted_features) or "none",
        "ranker_psi": MetadataValue.json({k: round(v, 5) for k, v in ranker.psi.items()}),
        "ranker_feature_status": MetadataValue.json(feature_statuses(ranker, thresholds)),
        "ranker_report": MetadataValue.path(str(ranker_html)),
        "ranker_report_url": artifacts.publish_report(ranker_html, context.run_id),
        "ranker_current_source": source, "ranker_n_reference": ranker.n_reference, "ranker_n_current": ranker.n_current,
        "ranker_psi_drives_status": config.ranker_psi_drives_status,
        **{f"{t}_version": p.version for t, p in pins.items()},
    })


class ImpressionLogConfig(Config):
    max_entries: int = 200_000     # stream entries landed per run
    skew_sample: int = 2_000       # served rows recomputed offline by the skew check
    skew_threshold: float = 0.01   # max mismatch rate per feature
    seed: int = 7


@asset(deps=[USER_FEATURES, ITEM_FEATURES, ITEMS], group_name="monitoring",
       code_version=source_version(__file__, "serving/impressions.py", "monitoring/skew.py"),
       check_specs=[AssetCheckSpec("served_features_match_offline", asset=IMPRESSION_LOG,
                                   description="Train/serve skew: served feature values recomputed offline as of the "
                                               "request time; a clock/version mismatch is reported as such, not as skew.")],
       description="Every served response (items, positions, scores, propensities, features, model version) from the "
                   "Redis impression stream, one row per shown item (Delta, appended idempotently by stream id).")
def impression_log(context: AssetExecutionContext, config: ImpressionLogConfig, lake: LakeResource,
                   redis: RedisResource):
    from monitoring.skew import (checked_features, clock_alignment, recompute_offline, served_feature_frame,
                                 skew_report)
    from serving.impressions import IMPRESSION_SCHEMA, read_impressions

    store = lake.lake()
    after = "0-0"
    if store.exists(IMPRESSION_LOG):
        ids = store.read(IMPRESSION_LOG, columns=["stream_id"])["stream_id"]
        if len(ids):
            after = max(ids, key=lambda s: tuple(int(x) for x in s.split("-")))
    new, last = read_impressions(redis.client(), after_id=after, count=config.max_entries)
    if len(new):
        batch = f"{new['stream_id'].iloc[0]}..{last}"
        store.write_batch(IMPRESSION_LOG, new.assign(batch_id=batch), batch_id=f"{IMPRESSION_LOG}:{batch}",
                          schema=IMPRESSION_SCHEMA,
                          replace_where=f"batch_id = '{batch}'", commit_properties={"run_id": context.run_id})
    log_pin = store.pin(IMPRESSION_LOG) if store.exists(IMPRESSION_LOG) else None
    context.log.info(f"impression log: {len(new)} new rows (stream entries after {after}), table has "
                     f"{log_pin.rows if log_pin else 0}")
    yield MaterializeResult(metadata={"new_rows": len(new), "last_stream_id": last,
                                      "rows": log_pin.rows if log_pin else 0,
                                      "delta_version": log_pin.version if log_pin else -1,
                                      "served_by": MetadataValue.json(new["served_by"].value_counts().to_dict()
                                                                      if len(new) else {})})
    # ---- skew: served features recomputed offline as of each request's time
    logged = store.read(IMPRESSION_LOG) if log_pin else pd.DataFrame()
    if len(logged):  # what users were actually shown, with the features it was scored on (not shadow answers)
        shown = ~logged["shadow"].fillna(False).astype(bool) if "shadow" in logged else True
        logged = logged[logged["features"].notna() & shown]
    if logged.empty:
        yield AssetCheckResult(check_name="served_features_match_offline", passed=False,
                               severity=AssetCheckSeverity.WARN, metadata={"rows": 0},
                               description="No served impressions with logged features yet: nothing to compare.")
        return
    sample = logged.sample(min(config.skew_sample, len(logged)), random_state=config.seed).reset_index(drop=True)
    pins = {t: store.pin(t) for t in (USER_FEATURES, ITEM_FEATURES, ITEMS)}
    user_snaps = store.read(USER_FEATURES, version=pins[USER_FEATURES].version)
    offline = recompute_offline(sample, user_snaps, store.read(ITEM_FEATURES, version=pins[ITEM_FEATURES].version),
                                store.read(ITEMS, version=pins[ITEMS].version))
    # a request whose clock does not select the snapshot it was served from is a clock/version mismatch, told
    # apart from skew (it once read 0.088 > 0.01 for requests stamped before the served snapshot)
    alignment = clock_alignment(sample, user_snaps["feature_ts"].unique())
    report = skew_report(served_feature_frame(sample), offline, checked_features(), threshold=config.skew_threshold,
                         alignment=alignment)
    worst, rate = report.worst
    context.log.info(f"skew check over {report.rows} served rows ({report.aligned_rows} with a matching clock): "
                     f"{report.verdict}, worst feature {worst} mismatch rate {rate:.4f}")
    descriptions = {
        "ok": "Served feature values match the offline recomputation as of the request time.",
        "skew": "TRAIN/SERVE SKEW: served feature values differ from the offline recomputation (same as-of rule "
                "and feature functions as training) on more than the threshold of rows whose clock matches the "
                "served snapshot. Look at mismatch_rate per feature.",
        "clock_version_mismatch": "CLOCK/VERSION MISMATCH, not skew: too many requests carry a timestamp that does "
                                  "not select the snapshot they were served from (stamped before it, absent, or "
                                  "the server was behind). Send context.timestamp_ms from a synchronized clock "
                                  "and keep the online store refreshed; the matching rows show no skew.",
        "no_aligned_rows": "No served row has a clock that matches its served snapshot: nothing comparable.",
    }
    yield AssetCheckResult(
        check_name="served_features_match_offline", passed=report.passed,
        severity=AssetCheckSeverity.ERROR if report.verdict == "skew" else AssetCheckSeverity.WARN,
        metadata={"rows": report.rows, "aligned_rows": report.aligned_rows, "verdict": report.verdict,
                  "clock_mismatch": MetadataValue.json(report.clock_mismatch),
                  "threshold": config.skew_threshold, "worst_feature": worst, "worst_mismatch_rate": rate,
                  "mismatch_rate": MetadataValue.json(dict(zip(report.per_feature["feature"],
                                                               report.per_feature["mismatch_rate"].round(6)))),
                  **{f"{t}_version": p.version for t, p in pins.items()}},
        description=descriptions[report.verdict],
    )


# --------------------------------------------------------------------------- feature health
class FeatureHealthConfig(Config):
    recent_days: float = 2.0           # the newest days of the training set are the offline window measured
    max_null_rate: float = 0.5         # per feature group: worst feature's share of rows served the default
    max_out_of_range_rate: float = 0.001  # per feature group: share of values outside the registry's valid_range
    # staleness limits in seconds; < 0 = from the environment (KAIROS_FRESHNESS_BATCH_MAX_AGE_S, default 26 h;
    # KAIROS_FRESHNESS_STREAMING_MAX_AGE_S, default 120 s) so the sensor and this check agree
    batch_max_age_s: float = -1.0
    streaming_max_age_s: float = -1.0
    online_sample_users: int = 500


def _age(value: float | None) -> float:
    """Metadata-safe age: -1 = unknown (no data), a large sentinel for 'never written'."""
    if value is None:
        return -1.0
    return 1e12 if math.isinf(value) else round(float(value), 3)


EASY_PREFIX = "easy:"  # event ids of sampled catalog negatives (ingestion.labels.sample_easy_negatives)


@asset(deps=[TRAINING_SET, ONLINE_FEATURES, IMPRESSION_LOG], group_name="monitoring",
       code_version=source_version(__file__, "monitoring/health.py"),
       check_specs=[AssetCheckSpec("feature_nulls_within_threshold", asset=FEATURE_HEALTH,
                                   description="Per feature group, the worst null (default-served) rate stays under max_null_rate."),
                    AssetCheckSpec("features_in_valid_range", asset=FEATURE_HEALTH,
                                   description="Share of values outside the registry's valid_range stays under max_out_of_range_rate."),
                    AssetCheckSpec("online_features_fresh", asset=FEATURE_HEALTH,
                                   description="The live Redis snapshot and the streaming session state are younger than their max age.")],
       description="Per feature group (user, item, user_item, session, context): null rate, out-of-range rate "
                   "(registry valid_range) and staleness of the newest online value (Redis).")
def feature_health(context: AssetExecutionContext, config: FeatureHealthConfig, lake: LakeResource,
                   redis: RedisResource):
    import time

    from features.online_keys import CURRENT_KEY
    from features.registry import ranker_feature_names
    from monitoring.drift import MODEL_OUTPUT_FEATURES, served_feature_window
    from monitoring.health import (FreshnessThresholds, feature_quality, group_staleness, group_summary,
                                   online_freshness, online_null_rates, served_out_of_range, stale_tiers)

    store = lake.lake()
    pin = store.pin(TRAINING_SET)
    # the model's own output is computed per request from the bundle: not in the offline tables
    measured = [f for f in ranker_feature_names() if f not in MODEL_OUTPUT_FEATURES]
    # only the newest recent_days and the measured features' raw columns are read (the rates are over these rows
    # and columns alone: the same figures as filtering the whole set, without decoding years of rows)
    newest = int(store.read(TRAINING_SET, version=pin.version, columns=["timestamp"])["timestamp"].max())
    recent = _feature_rows(store, pin.version, measured,
                           filters=[("timestamp", ">", newest - int(config.recent_days * DAY_MS))])
    # sampled catalog negatives (ingestion/labels.py, ids "easy:...") are mostly items with no recent activity:
    # their defaults are by design, not a feature pipeline losing values, so health is measured on real rows
    recent = recent[~recent["event_id"].astype(str).str.startswith(EASY_PREFIX)]
    quality = feature_quality(recent, measured)
    groups = group_summary(quality)
    served = served_feature_window(store.read(IMPRESSION_LOG, columns=SERVED_FEATURE_COLUMNS), config.recent_days) \
        if store.exists(IMPRESSION_LOG) else pd.DataFrame()
    served_oor = served_out_of_range(served) if len(served) else pd.DataFrame()
    if len(served_oor):
        for entity, entry in group_summary(served_oor, ("served_out_of_range_rate",)).items():
            groups.setdefault(entity, {}).update(entry)
    client = redis.client()
    fresh = online_freshness(client, time.time())
    thresholds = FreshnessThresholds.from_env(config.batch_max_age_s, config.streaming_max_age_s)
    stale = stale_tiers(fresh, thresholds)
    by_group = group_staleness({t: stale.get(t, info.get("age_s")) for t, info in fresh.items()})
    for entity, age in by_group.items():
        groups.setdefault(entity, {})["staleness_s"] = _age(age)
    online_nulls = online_null_rates(client, client.get(CURRENT_KEY), sample_users=config.online_sample_users)
    context.log.info(f"feature health over {len(recent)} recent rows: groups {groups}; stale tiers {stale or 'none'}")
    flat = {}
    for entity, entry in groups.items():
        for key in ("null_rate", "out_of_range_rate", "served_out_of_range_rate", "staleness_s"):
            if key in entry:
                flat[f"{key}.{entity}"] = entry[key]
    yield MaterializeResult(metadata={
        "rows": len(recent), "served_rows": len(served), "training_set_version": pin.version,
        "groups": MetadataValue.json(groups),
        "features": MetadataValue.json(quality.round(6).to_dict("records")),
        "online_null_rate": MetadataValue.json(online_nulls),
        "freshness": MetadataValue.json({t: {k: (_age(v) if k == "age_s" else v) for k, v in info.items()}
                                         for t, info in fresh.items()}),
        "staleness_s.batch": _age(fresh["batch"].get("age_s") if "batch" not in stale else stale["batch"]),
        "staleness_s.streaming": _age(fresh["streaming"].get("age_s")),
        "stale_tiers": ",".join(sorted(stale)) or "none", **flat,
    })
    worst_null = max(groups.items(), key=lambda kv: kv[1].get("null_rate", 0.0))
    yield AssetCheckResult(
        check_name="feature_nulls_within_threshold",
        passed=all(g.get("null_rate", 0.0) <= config.max_null_rate for g in groups.values()),
        metadata={"threshold": config.max_null_rate, "worst_group": worst_null[0],
                  "worst_null_rate": worst_null[1].get("null_rate", 0.0),
                  "worst_feature": worst_null[1].get("null_rate_worst_feature", "")},
        description="Per feature group, the worst feature's share of recent rows that fell back to the registry "
                    "default (a missing snapshot row or input).")
    oor = {e: max(g.get("out_of_range_rate", 0.0), g.get("served_out_of_range_rate", 0.0)) for e, g in groups.items()}
    yield AssetCheckResult(
        check_name="features_in_valid_range", passed=all(v <= config.max_out_of_range_rate for v in oor.values()),
        metadata={"threshold": config.max_out_of_range_rate, "out_of_range_rate": MetadataValue.json(oor)},
        description="Share of offline and served feature values outside the registry's declared valid_range.")
    yield AssetCheckResult(
        check_name="online_features_fresh", passed=not stale,
        severity=AssetCheckSeverity.ERROR,
        metadata={"stale_tiers": ",".join(sorted(stale)) or "none",
                  "batch_max_age_s": thresholds.batch_max_age_s, "streaming_max_age_s": thresholds.streaming_max_age_s,
                  **{f"age_s.{t}": _age(a) for t, a in stale.items()}},
        description="The live snapshot in Redis is younger than the batch limit and no streamed event has waited "
                    "longer than the streaming limit to reach the session keys.")


# --------------------------------------------------------------------------- served model health
_ATTRIBUTION_HOURS = Knob("attribution_window_hours", "attribution_window_ms", scale=HOUR_MS, type=float)


# the labels' attribution window (LabelConfig's, in hours) over the impressions of the log's last window_days
if TYPE_CHECKING:
    ServedHealthConfig = Any
else:
    ServedHealthConfig = dataclass_config("ServedHealthConfig", LabelConfig, (
        Knob("window_days", None, type=float, default=7.0), _ATTRIBUTION_HOURS), __name__)


def _served_window(store, window_days: float) -> pd.DataFrame:
    log = store.read(IMPRESSION_LOG)
    if log.empty:
        return log
    ts = log["request_ts"].astype("int64")
    return log[ts > int(ts.max()) - int(window_days * DAY_MS)].reset_index(drop=True)


def _attributed(store, log: pd.DataFrame, config: Any) -> pd.DataFrame:
    """Shown impressions with clicks credited from silver events (shadow rows were never shown: no clicks)."""
    from monitoring.health import attribute_engagement

    shown = log[~log["shadow"].fillna(False).astype(bool)]
    start = int(shown["request_ts"].min()) if len(shown) else 0
    events = store.read(SILVER, columns=["event_id", "user_id", "item_id", "event_type", "timestamp", "dwell_time_ms"],
                        filters=[("timestamp", ">=", start)])
    return attribute_engagement(shown, events, to_dataclass(config, LabelConfig).attribution_window_ms)


@asset(deps=[IMPRESSION_LOG, SILVER], group_name="monitoring", code_version=source_version(__file__, "monitoring/health.py"),
       description="Per served model version: score distribution (quantiles, histogram), prediction entropy, and "
                   "CTR at positions 1, 3 and 10 with clicks attributed from silver events as labels are.")
def served_model_health(context: AssetExecutionContext, config: ServedHealthConfig, lake: LakeResource) -> MaterializeResult:
    from monitoring.health import served_model_health as health

    store = lake.lake()
    if not store.exists(IMPRESSION_LOG):
        context.log.info("no impression log yet: nothing served to measure")
        return MaterializeResult(metadata={"rows": 0, "models": MetadataValue.json({})})
    log = _served_window(store, config.window_days)
    shown = _attributed(store, log, config)
    shadow = log[log["shadow"].fillna(False).astype(bool)]
    frame = pd.concat([shown, shadow], ignore_index=True) if len(shadow) else shown
    models = health(frame) if len(frame) else {}
    flat = {}
    for version, entry in models.items():
        for key in ("ctr_at_1", "ctr_at_3", "ctr_at_10", "mean_binary_entropy_bits", "mean_slate_entropy"):
            if key in entry and entry[key] is not None and not (isinstance(entry[key], float) and math.isnan(entry[key])):
                flat[f"{key}.{version}"] = entry[key]
        if entry["scores"].get("n"):
            flat[f"score_p50.{version}"] = entry["scores"]["quantiles"]["p50"]
    context.log.info(f"served model health over {len(log)} logged rows: {flat}")
    return MaterializeResult(metadata={"rows": len(log), "shown_rows": len(shown), "clicks": int(shown["clicked"].sum())
                                       if len(shown) else 0, "models": MetadataValue.json(models), **flat,
                                       "impression_log_version": store.version(IMPRESSION_LOG)})


# --------------------------------------------------------------------------- off-policy evaluation
# the labels' attribution window as in ServedHealthConfig, then the challenger's policy over the logged slate
# (monitoring/ope.slate_target_probabilities): epsilon-greedy like serving/rerank.explore, epsilon < 0 = the serving
# default (KAIROS_EXPLORATION_EPSILON); explore_from: the first slot that explores (serving/rerank.py), < 0 =
# KAIROS_EXPLORATION_FROM's; temperature > 0: a softmax (Plackett-Luce) policy over the challenger's scores
if TYPE_CHECKING:
    OPEConfig = Any
else:
    OPEConfig = dataclass_config("OPEConfig", LabelConfig, (
        Knob("window_days", None, type=float, default=7.0), _ATTRIBUTION_HOURS,
        Knob("epsilon", None, type=float, default=-1.0), Knob("explore_from", None, type=int, default=-1),
        Knob("temperature", None, type=float, default=0.0), Knob("max_weight", None, type=float, default=10.0),
        Knob("n_bootstrap", None, type=int, default=500), Knob("seed", None, type=int, default=7),
    ), __name__)


def challenger_scores(bundle, logged: pd.DataFrame) -> pd.Series:
    """The challenger's ranker scores for logged shown items, from the logged feature values; embedding_affinity
    is the challenger's own (user tower without session history, which the log does not hold) on rows another
    model version served."""
    import numpy as np

    from monitoring.skew import served_feature_frame

    feats = served_feature_frame(logged)
    other = (logged["model_version"].astype(str) != str(bundle.model_version)).to_numpy()
    if other.any():
        rows = logged[other]
        codes, users = pd.factorize(rows["user_id"].astype(str))
        user_vecs = np.stack([bundle.user_vector(u, []) for u in users])
        item_vecs = bundle.item_vectors(rows["item_id"].astype(str).tolist())
        aff = feats["embedding_affinity"].to_numpy(dtype=float).copy()
        aff[other] = np.einsum("ij,ij->i", item_vecs, user_vecs[codes])
        feats["embedding_affinity"] = aff
    return pd.Series(bundle.rank(feats), index=logged.index)


@asset(deps=[IMPRESSION_LOG, SILVER, "registered_model"], group_name="monitoring",
       code_version=source_version(__file__, "monitoring/ope.py"),
       description="The challenger's expected CTR estimated from the champion's logged propensities (IPS, clipped "
                   "IPS, SNIPS with bootstrap CIs and effective sample size) before it serves.")
def off_policy_evaluation(context: AssetExecutionContext, config: OPEConfig, lake: LakeResource,
                          mlflow: MlflowResource) -> MaterializeResult:
    from models.registry import CHALLENGER, CHAMPION, alias_version, load_alias
    from monitoring.ope import evaluate_policy, slate_target_probabilities
    from serving.rerank import RerankConfig, exploration_rate

    settings = mlflow.settings()
    champion, challenger = alias_version(settings, CHAMPION), alias_version(settings, CHALLENGER)
    base = {"champion_version": champion or "none", "challenger_version": challenger or "none"}
    store = lake.lake()
    if challenger is None or challenger == champion:
        context.log.info(f"no challenger distinct from the champion ({base}): nothing to evaluate")
        return MaterializeResult(metadata={**base, "status": "no_challenger"})
    if not store.exists(IMPRESSION_LOG):
        return MaterializeResult(metadata={**base, "status": "no_traffic"})
    log = _served_window(store, config.window_days)
    log = log[~log["shadow"].fillna(False).astype(bool) & log["features"].notna()
              & log["served_by"].fillna("").str.startswith("two_stage") & (log["propensity"] > 0)]
    if log.empty:
        return MaterializeResult(metadata={**base, "status": "no_traffic"})
    rows = _attributed(store, log, config)
    bundle = load_alias(settings, CHALLENGER)
    serving = RerankConfig.from_env()  # what serving was told
    epsilon = config.epsilon if config.epsilon >= 0 else serving.epsilon
    first = config.explore_from if config.explore_from >= 0 else serving.explore_from
    scores = challenger_scores(bundle, rows)
    target = slate_target_probabilities(rows, scores.to_numpy(), epsilon=exploration_rate(epsilon, first),
                                        temperature=config.temperature, first=first)
    result = evaluate_policy(rows.assign(reward=rows["clicked"].astype(float)), target, max_weight=config.max_weight,
                             n_bootstrap=config.n_bootstrap, seed=config.seed)
    context.log.info(f"OPE of challenger v{challenger} on {result.n} logged rows: IPS {result.ips:.4f} "
                     f"{result.ci['ips']}, SNIPS {result.snips:.4f}, logged CTR {result.logged_value:.4f}, "
                     f"ESS {result.ess:.1f}")
    return MaterializeResult(metadata={
        **base, "status": "estimated", **result.as_metadata(), "epsilon": epsilon, "explore_from": first, "temperature": config.temperature,
        "snips_lift_over_logged": round(result.snips - result.logged_value, 6),
        "logged_model_versions": MetadataValue.json(rows["model_version"].astype(str).value_counts().to_dict()),
    })
