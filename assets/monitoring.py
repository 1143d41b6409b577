"""Monitoring assets: PSI drift of recent behaviour against the training window (Evidently)."""

from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset

from assets.features import TRAINING_SET
from assets.ingestion import ITEMS, SILVER
from ingestion.schema import DAY_MS
from orchestration.resources import ArtifactsResource, LakeResource

FEATURE_DRIFT = "feature_drift"


class DriftConfig(Config):
    recent_days: float = 2.0
    warn_psi: float = 0.2
    act_psi: float = 0.25


@asset(deps=[SILVER, ITEMS, TRAINING_SET], group_name="monitoring",
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
