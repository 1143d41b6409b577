"""The daily-partitioned event assets in real Dagster runs: one-day backfill, range backfill, idempotent replay."""
from __future__ import annotations

import pytest
from dagster import AssetKey, DagsterInstance, materialize

from assets.ingestion import (BRONZE, QUARANTINE, SILVER, SourceConfig, bronze_events, daily_partitions, silver_events,
                              source_partitions)
from lake.delta import DeltaLake
from assets.resources import ArtifactsResource, LakeResource

SOURCE = {"n_users": 60, "n_items": 80, "n_categories": 4, "days": 3, "seed": 21}
RUN_CONFIG = {"ops": {"bronze_events": {"config": SOURCE}}}
RESOURCES = {"lake": LakeResource(), "artifacts": ArtifactsResource()}


def _check(result, name: str):
    evals = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    assert evals, f"check {name} did not run"
    return evals[-1]


@pytest.fixture()
def instance(settings):  # `settings` points KAIROS_HOME at a temp folder
    with DagsterInstance.ephemeral() as inst:
        yield inst


def test_one_day_backfill_then_replay_changes_nothing(settings, instance) -> None:
    days = source_partitions(SourceConfig(**SOURCE))
    assert days[0] == "2026-01-01" and set(days) <= set(daily_partitions.get_partition_keys())
    day = days[1]
    first = materialize([bronze_events, silver_events], partition_key=day, run_config=RUN_CONFIG, resources=RESOURCES,
                        instance=instance)
    assert first.success
    reconcile = _check(first, "counts_reconcile")
    assert reconcile.passed, reconcile.metadata
    lake = DeltaLake(settings.lake_uri)
    bronze = lake.read(BRONZE)
    assert set(bronze["ingest_date"]) == {day}  # only the backfilled day was ingested
    silver, quarantine = lake.read(SILVER), lake.read(QUARANTINE)
    assert len(bronze) == len(silver) + len(quarantine)
    assert set(quarantine["disposition"]) <= {"contract", "duplicate", "bot"} and len(quarantine) > 0
    meta = instance.get_latest_materialization_event(AssetKey(SILVER)).asset_materialization.metadata
    assert meta["n_in"].value == len(bronze) and meta["accepted"].value == len(silver)
    versions = {t: lake.version(t) for t in (BRONZE, SILVER, QUARANTINE)}

    replay = materialize([bronze_events, silver_events], partition_key=day, run_config=RUN_CONFIG, resources=RESOURCES,
                         instance=instance)
    assert replay.success and _check(replay, "counts_reconcile").passed
    assert {t: lake.version(t) for t in versions} == versions  # same input: no new Delta version anywhere
    assert len(lake.read(SILVER)) == len(silver)


def test_range_backfill_in_one_run_covers_every_day_and_reconciles(settings, instance) -> None:
    days = source_partitions(SourceConfig(**SOURCE))
    result = materialize([bronze_events, silver_events], run_config=RUN_CONFIG, resources=RESOURCES, instance=instance,
                         tags={"dagster/asset_partition_range_start": days[0],
                               "dagster/asset_partition_range_end": days[-1]})
    assert result.success
    check = _check(result, "counts_reconcile")
    assert check.passed
    lake = DeltaLake(settings.lake_uri)
    bronze, silver, quarantine = lake.read(BRONZE), lake.read(SILVER), lake.read(QUARANTINE)
    assert sorted(set(bronze["ingest_date"])) == days
    assert len(bronze) == len(silver) + len(quarantine) == check.metadata["in"].value
    assert silver["event_id"].is_unique
    # silver is partitioned by the day events happened; late arrivals sit in their event day
    assert (silver["event_date"] <= silver["ingest_date"]).all()
    assert (silver["event_date"] < silver["ingest_date"]).any()


def test_lake_maintenance_compacts_without_changing_data(settings, instance) -> None:
    from assets.maintenance import lake_maintenance

    days = source_partitions(SourceConfig(**SOURCE))
    for day in days[:3]:  # three single-day runs: many small files
        assert materialize([bronze_events, silver_events], partition_key=day, run_config=RUN_CONFIG,
                           resources=RESOURCES, instance=instance).success
    corrected = {"ops": {"bronze_events": {"config": {**SOURCE, "seed": 22}}}}  # a corrected day replaces its files
    assert materialize([bronze_events, silver_events], partition_key=days[0], run_config=corrected,
                       resources=RESOURCES, instance=instance).success
    lake = DeltaLake(settings.lake_uri)
    before = {t: lake.read(t).sort_values("event_id").reset_index(drop=True) for t in (BRONZE, SILVER)}
    result = materialize([lake_maintenance], resources=RESOURCES, instance=instance,
                         run_config={"ops": {"lake_maintenance": {"config": {"retention_hours": 0}}}})
    assert result.success
    report = instance.get_latest_materialization_event(AssetKey("lake_maintenance")).asset_materialization.metadata
    tables = report["report"].value
    assert set(tables) >= {BRONZE, SILVER, QUARANTINE}
    assert tables[SILVER]["files_after"] <= tables[SILVER]["files_before"] and report["files_vacuumed"].value > 0
    for t, frame in before.items():
        after = lake.read(t).sort_values("event_id").reset_index(drop=True)
        assert len(after) == len(frame) and after["event_id"].tolist() == frame["event_id"].tolist()


def test_a_generic_csv_log_ingests_through_the_same_assets(settings, instance, tmp_path) -> None:
    import pandas as pd

    rows = []
    for u in range(5):
        for k in range(6):
            rows.append({"uid": f"user{u}", "sku": f"sku{k}", "ts": 1_767_240_000 + u * 3600 + k * 60, "kind": "click"})
    rows.append({"uid": "user0", "sku": "sku0", "ts": 1_767_240_000 + 86_400, "kind": "teleport"})  # unknown type
    path = tmp_path / "log.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    mapping = '{"user": "uid", "item": "sku", "timestamp": "ts", "event_type": "kind", "timestamp_unit": "s"}'
    config = {"source": "file", "path": str(path), "mapping_json": mapping}
    days = source_partitions(SourceConfig(**config))
    result = materialize([bronze_events, silver_events], run_config={"ops": {"bronze_events": {"config": config}}},
                         resources=RESOURCES, instance=instance,
                         tags={"dagster/asset_partition_range_start": days[0],
                               "dagster/asset_partition_range_end": days[-1]})
    assert result.success and _check(result, "counts_reconcile").passed
    lake = DeltaLake(settings.lake_uri)
    quarantine = lake.read(QUARANTINE)
    silver = lake.read(SILVER)
    # 30 clicks + one implied impression per (session, item): an events log without impressions stays labelable
    assert (silver["event_type"] == "click").sum() == 30 and (silver["event_type"] == "impression").sum() == 30
    assert quarantine["reasons"].str.contains("event_type_known").sum() == 1
