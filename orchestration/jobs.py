"""Jobs: daily event ingestion (partitioned), the build of everything downstream, retrain, maintenance."""

from dagster import AssetSelection, define_asset_job

from assets.ingestion import EVENT_ASSETS, daily_partitions
# the default run config of every job (the launchpad opens with it); the training jobs also run in process
from orchestration.launch import GRAPH_RUN_DEFAULTS, QUIET_LOGS

_events = AssetSelection.assets(*EVENT_ASSETS)
_maintenance = AssetSelection.groups("maintenance")
_served = AssetSelection.assets("impression_log")  # needs traffic: its own job
_tuning = AssetSelection.groups("tuning")  # optional, on demand: its own job
_rollout = AssetSelection.groups("rollout")  # judges live traffic: its own job (with the impression log it reads)
_served_health = AssetSelection.assets("served_model_health", "off_policy_evaluation")  # read traffic: monitor job

ingest_job = define_asset_job(
    "ingest_events", config=QUIET_LOGS, selection=_events, partitions_def=daily_partitions,
    description="One ingest day (or a range, as one run): bronze → contract, dedup, bots → silver + quarantine.",
)

build_job = define_asset_job(
    "build", config=GRAPH_RUN_DEFAULTS,
    selection=AssetSelection.all() - _events - _maintenance - _served - _served_health - _tuning - _rollout,
    description="Everything downstream of the events: catalog, labels, features, training, gates, registry, "
                "online store, drift.",
)

retrain_job = define_asset_job(
    "retrain", config=GRAPH_RUN_DEFAULTS,
    selection=AssetSelection.assets("labels", "online_features") | AssetSelection.groups("features", "training"),
    description="Relabel, rebuild features and the training set, retrain, gate, register, refresh the online store.",
)

maintenance_job = define_asset_job("lake_maintenance_job", config=QUIET_LOGS, selection=_maintenance,
                                   description="OPTIMIZE and VACUUM the Delta tables.")

impressions_job = define_asset_job("log_impressions", config=QUIET_LOGS, selection=_served,
                                   description="Land served impressions from Redis in Delta and run the train/serve skew check.")

tune_job = define_asset_job("tune_ranker", config=GRAPH_RUN_DEFAULTS, selection=_tuning,
                            description="Random search over the ranker's LightGBM knobs on the validation window "
                                        "(then retrain with ranker_model config use_tuned_params: true).")

rollout_job = define_asset_job("rollout", config=QUIET_LOGS, selection=_served | _rollout,
                               description="Land impressions, compare the shadowed challenger, evaluate the canary per "
                                           "arm, then start the canary, promote or roll back (assets/rollout.py).")

monitor_job = define_asset_job(
    "monitor", config=QUIET_LOGS, selection=AssetSelection.assets("feature_health") | _served_health,
    description="Feature health (nulls, ranges, staleness), served-model health (scores, entropy, CTR@k) and the "
                "off-policy estimate of the challenger from the impression log.")

refresh_online_job = define_asset_job(
    "refresh_online_store", config=QUIET_LOGS, selection=AssetSelection.assets("online_features", "feature_health"),
    description="Rewrite the newest feature snapshot to Redis and re-measure feature health (freshness sensor).")
