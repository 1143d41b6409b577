"""Jobs: the whole graph, and the retrain path the drift sensor and the schedule request."""
from __future__ import annotations

from dagster import AssetSelection, define_asset_job

full_pipeline = define_asset_job(
    "full_pipeline", selection=AssetSelection.all(),
    description="Every asset: ingest, contract, labels, features, training, gates, registry, online store, drift.",
)

retrain_job = define_asset_job(
    "retrain",
    selection=AssetSelection.assets("labels", "online_features") | AssetSelection.groups("features", "training"),
    description="Relabel, rebuild features and the training set, retrain, gate, register, refresh the online store.",
)
