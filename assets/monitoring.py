"""Monitoring assets: PSI drift (Evidently), and the impression log with its train/serve skew check."""

import pandas as pd
from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, Config,
                     MaterializeResult, MetadataValue, asset)

from assets.features import ITEM_FEATURES, TRAINING_SET, USER_FEATURES
from assets.ingestion import ITEMS, SILVER
from compliance.versions import source_version
from ingestion.schema import DAY_MS
from orchestration.resources import ArtifactsResource, LakeResource, RedisResource

FEATURE_DRIFT = "feature_drift"


class DriftConfig(Config):
    recent_days: float = 2.0
    warn_psi: float = 0.2
    act_psi: float = 0.25


@asset(deps=[SILVER, ITEMS, TRAINING_SET], group_name="monitoring",
       code_version=source_version(__file__, "monitoring/drift.py"),
       description="PSI per behavioural feature: the last days of events versus the training window (Evidently report).")
def feature_drift(context: AssetExecutionContext, config: DriftConfig, lake: LakeResource,
                  artifacts: ArtifactsResource) -> MaterializeResult:
    from monitoring.drift import DriftThresholds, drift_report, event_drift_frame

    store = lake.lake()
    pins = {t: store.pin(t) for t in (SILVER, ITEMS, TRAINING_SET)}
    events = store.read(SILVER, version=pins[SILVER].version)
    items = store.read(ITEMS, version=pins[ITEMS].version)
    ts = store.read(TRAINING_SET, version=pins[TRAINING_SET].version, columns=["timestamp", "split"])
    train_ts = ts.loc[ts["split"] == "train", "timestamp"]
    ref_events = events[(events["timestamp"] >= train_ts.min()) & (events["timestamp"] <= train_ts.max())]
    recent_start = int(events["timestamp"].max()) - int(config.recent_days * DAY_MS)
    cur_events = events[events["timestamp"] > max(recent_start, int(train_ts.max()))]
    if cur_events.empty:
        cur_events = events[events["timestamp"] > recent_start]
    reference = event_drift_frame(ref_events, items)
    current = event_drift_frame(cur_events, items)
    columns = [c for c in reference.columns if c in current.columns and c not in ("session_id", "user_id")]
    html = artifacts.path("reports", context.run_id) / "drift.html"
    result = drift_report(reference, current, columns, html_path=html,
                          thresholds=DriftThresholds(warn=config.warn_psi, act=config.act_psi))
    context.log.info(f"drift status {result.status}: max PSI {result.max_psi:.3f}")
    return MaterializeResult(metadata={
        **result.as_metadata(), "status": result.status, "max_psi": float(result.max_psi),
        "psi": MetadataValue.json(result.psi), "report": MetadataValue.path(str(html)),
        **{f"{t}_version": p.version for t, p in pins.items()},
    })


IMPRESSION_LOG = "impression_log"


class ImpressionLogConfig(Config):
    max_entries: int = 200_000     # stream entries landed per run
    skew_sample: int = 2_000       # served rows recomputed offline by the skew check
    skew_threshold: float = 0.01   # max mismatch rate per feature
    seed: int = 7


@asset(deps=[USER_FEATURES, ITEM_FEATURES, ITEMS], group_name="monitoring",
       code_version=source_version(__file__, "serving/impressions.py", "monitoring/skew.py"),
       check_specs=[AssetCheckSpec("served_features_match_offline", asset=IMPRESSION_LOG)],
       description="Every served response (items, positions, scores, propensities, features, model version) from the "
                   "Redis impression stream, one row per shown item (Delta, appended idempotently by stream id).")
def impression_log(context: AssetExecutionContext, config: ImpressionLogConfig, lake: LakeResource,
                   redis: RedisResource):
    from monitoring.skew import checked_features, recompute_offline, served_feature_frame, skew_report
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
    offline = recompute_offline(sample, store.read(USER_FEATURES, version=pins[USER_FEATURES].version),
                                store.read(ITEM_FEATURES, version=pins[ITEM_FEATURES].version),
                                store.read(ITEMS, version=pins[ITEMS].version))
    report = skew_report(served_feature_frame(sample), offline, checked_features(), threshold=config.skew_threshold)
    worst, rate = report.worst
    context.log.info(f"skew check over {report.rows} served rows: worst feature {worst} mismatch rate {rate:.4f}")
    yield AssetCheckResult(
        check_name="served_features_match_offline", passed=report.passed,
        metadata={"rows": report.rows, "threshold": config.skew_threshold, "worst_feature": worst,
                  "worst_mismatch_rate": rate,
                  "mismatch_rate": MetadataValue.json(dict(zip(report.per_feature["feature"],
                                                               report.per_feature["mismatch_rate"].round(6)))),
                  **{f"{t}_version": p.version for t, p in pins.items()}},
        description="Served feature values recomputed offline as of the request time (same as-of rule and feature "
                    "functions as training); fails when any feature mismatches on more than the threshold of rows.",
    )
