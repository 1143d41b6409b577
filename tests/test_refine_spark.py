"""The spark engine of silver_events and labels equals the pandas engine row for row (same rules, one code path): a
simulated world ingested in two runs (the second run's dedup looks back at the first's silver), then labeled (catalog
negatives by popularity included), once per engine."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from dagster import AssetKey, DagsterInstance, materialize

from assets.ingestion import (BRONZE, LABELS, QUARANTINE, SILVER, SourceConfig, bronze_events, labels,
                              silver_events, source_partitions)
from assets.resources import ArtifactsResource, LakeResource
from lake.delta import DeltaLake

# bots on (300 users x 6 days: a few scripted sessions), retries, duplicates, malformed rows, late arrivals
SOURCE = {"n_users": 300, "n_items": 120, "n_categories": 4, "days": 6, "seed": 6}
RESOURCES = {"lake": LakeResource(), "artifacts": ArtifactsResource()}


def _ingest(home: Path, engine: str, monkeypatch: pytest.MonkeyPatch) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    monkeypatch.setenv("KAIROS_HOME", str(home))
    monkeypatch.delenv("KAIROS_LAKE_URI", raising=False)
    days = source_partitions(SourceConfig(**SOURCE))
    cut = len(days) // 2
    metas = []
    with DagsterInstance.ephemeral() as instance:
        for part in (days[:cut], days[cut:]):  # two runs: the second one's dedup looks back at the first's silver
            run_config = {"ops": {"bronze_events": {"config": SOURCE},
                                  "silver_events": {"config": {"engine": engine}}}}
            result = materialize([bronze_events, silver_events], run_config=run_config, resources=RESOURCES,
                                 instance=instance, tags={"dagster/asset_partition_range_start": part[0],
                                                          "dagster/asset_partition_range_end": part[-1]})
            assert result.success
            checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
            assert checks["counts_reconcile"], checks
            metas.append(instance.get_latest_materialization_event(AssetKey(SILVER)).asset_materialization.metadata)
        labeled = materialize([labels], resources=RESOURCES, instance=instance,
                              run_config={"ops": {"labels": {"config": {"engine": engine}}}})
        assert labeled.success
        label_meta = instance.get_latest_materialization_event(AssetKey(LABELS)).asset_materialization.metadata
    lake = DeltaLake(str(home / "lake")) if not os.environ.get("KAIROS_LAKE_URI") else None
    from ground.settings import Settings

    lake = DeltaLake(Settings.from_env().lake_uri)
    assert len(lake.read(BRONZE)) == len(lake.read(SILVER)) + len(lake.read(QUARANTINE))
    counts = [{k: m[k].value for k in ("n_in", "accepted", "quarantined", "duplicates", "bot_filtered")} for m in metas]
    counts += [m["expectation_failures"].value for m in metas] + [m["duplicate_reasons"].value for m in metas]
    summary = {k: label_meta[k].value for k in ("rows", "positive_rate", "positive_rows", "hard_rows", "easy_rows",
                                                 "as_of_ms", "forgotten_user_events_excluded")}
    return lake.read(SILVER), lake.read(QUARANTINE), {"counts": counts, "labels": summary, "label_rows": lake.read(LABELS)}


def _canon(frame: pd.DataFrame, drop: tuple[str, ...] = ()) -> list[tuple]:
    frame = frame.drop(columns=[c for c in drop if c in frame.columns])
    if "raw_payload" in frame:  # the same JSON object (a float 3.0 and an int 3 are one number)
        frame = frame.assign(raw_payload=[json.dumps(json.loads(p), sort_keys=True, default=str) if p else p
                                          for p in (json.dumps({k: (float(v) if isinstance(v, (int, float)) and not
                                                                    isinstance(v, bool) else v)
                                                                for k, v in json.loads(x).items()})
                                                    for x in frame["raw_payload"])])
    rows = frame.astype(object).where(frame.notna(), None)
    return sorted(tuple(str(v) for v in r) for r in rows[sorted(rows.columns)].itertuples(index=False))


def test_spark_engine_equals_pandas_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    silver_p, quarantine_p, meta_p = _ingest(tmp_path / "pandas", "pandas", monkeypatch)
    silver_s, quarantine_s, meta_s = _ingest(tmp_path / "spark", "spark", monkeypatch)
    assert set(quarantine_p["disposition"]) == {"contract", "duplicate", "bot"}  # every rule fired
    assert quarantine_p["reasons"].str.contains("seen in an earlier batch|within_window").any()
    assert _canon(silver_s) == _canon(silver_p)
    assert _canon(quarantine_s, ("run_id", "quarantined_at")) == _canon(quarantine_p, ("run_id", "quarantined_at"))
    labels_p, labels_s = meta_p.pop("label_rows"), meta_s.pop("label_rows")
    assert meta_p["labels"]["easy_rows"] > 0 and meta_p["labels"]["positive_rows"] > 0
    assert _canon(labels_s) == _canon(labels_p)
    assert meta_s == meta_p
