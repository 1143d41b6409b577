"""The Dagster definitions load as one graph, and the drift sensor's decision logic."""
from __future__ import annotations

from dagster import AssetKey

from assets.resources import LakeResource
from orchestration.definitions import defs
from orchestration.sensors import drift_decision


def test_one_definitions_with_the_whole_graph() -> None:
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"bronze_events", "silver_events", "labels", "user_features", "item_features", "training_set",
            "two_tower_model", "faiss_index", "ranker_model", "model_evaluation", "validation_gate",
            "registered_model", "online_features", "feature_drift", "quarantine_events", "catalog_items",
            "lake_maintenance"} <= keys
    assert graph.get(AssetKey("silver_events")).partitions_def is not None  # daily, backfillable per day
    assert graph.get(AssetKey("labels")).partitions_def is None
    checks = {c.to_user_string() for c in graph.asset_check_keys}
    assert {"silver_events:events_contract", "silver_events:counts_reconcile",
            "training_set:point_in_time_correct", "faiss_index:index_recall", "validation_gate:gate_passed"} <= checks
    retrain = set(defs.resolve_job_def("retrain").graph.node_names())
    assert "registered_model" in retrain and "bronze_events" not in retrain
    assert {"bronze_events", "silver_events"} <= set(defs.resolve_job_def("ingest_events").graph.node_names())
    for name in ("daily_ingest", "daily_retrain", "weekly_lake_maintenance"):
        assert defs.resolve_schedule_def(name).name == name
    assert defs.resolve_sensor_def("drift_sensor").job_name == "retrain"


def test_drift_decision_respects_threshold_and_interval() -> None:
    assert drift_decision("ok", 0.05, None, 1000.0)[0] is False
    assert drift_decision("warn", 0.22, None, 1000.0)[0] is False
    fire, reason = drift_decision("act", 0.31, None, 1000.0)
    assert fire and "0.310" in reason
    assert drift_decision("act", 0.31, last_retrain_ts=900.0, now=1000.0, min_interval_s=3600)[0] is False
    assert drift_decision("act", 0.31, last_retrain_ts=0.0, now=7200.0, min_interval_s=3600)[0] is True


def test_drift_sensor_requests_retrain_from_a_real_instance() -> None:
    from dagster import AssetMaterialization, DagsterInstance, build_sensor_context

    sensor = defs.resolve_sensor_def("drift_sensor")
    with DagsterInstance.ephemeral() as instance:
        instance.report_runless_asset_event(AssetMaterialization("feature_drift", metadata={"status": "ok", "max_psi": 0.05}))
        quiet = sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=defs))
        assert not quiet.run_requests
        cursor = quiet.cursor
        instance.report_runless_asset_event(AssetMaterialization("feature_drift", metadata={"status": "act", "max_psi": 0.41}))
        loud = sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=defs, cursor=cursor))
        assert len(loud.run_requests) == 1
        request = loud.run_requests[0]
        assert request.tags["kairos/trigger"] == "drift" and "0.410" in request.tags["kairos/reason"]


def test_every_asset_has_owner_kinds_tags_and_every_check_a_description() -> None:
    """What the catalog shows: owners, kinds and tags on all assets; checks explained; the gating ones blocking."""
    from orchestration.definitions import defs

    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.owners and node.kinds and node.tags.get("kairos/domain"), key
        assert node.description, key
        assert len(node.kinds) <= 3, (key, node.kinds)  # Dagster shows at most three
    specs = {spec.name: spec for ad in graph.assets_defs for spec in ad.check_specs}
    assert len(specs) >= 12
    assert all(spec.description for spec in specs.values()), [n for n, s in specs.items() if not s.description]
    blocking = {n for n, s in specs.items() if s.blocking}
    assert blocking == {"counts_reconcile", "point_in_time_correct", "index_recall"}


def test_resources_are_configured_through_envvar(tmp_path, monkeypatch) -> None:
    """A variable the code location's environment sets configures its resource as `EnvVar` (resolved in the run,
    never baked into the definitions); unset, the resource keeps its embedded default (`kairos demo`)."""
    from dagster import EnvVar, asset, materialize

    from orchestration.definitions import RESOURCE_ENV, resources

    empty = resources({})
    assert not any(isinstance(getattr(empty[key], field), EnvVar) for key, (field, _) in RESOURCE_ENV.items())
    configured = resources({var: "set" for _, var in RESOURCE_ENV.values()})
    assert all(getattr(configured[key], field) == EnvVar(var) for key, (field, var) in RESOURCE_ENV.items())

    @asset
    def lake_root(lake: LakeResource) -> str:  # annotation resolved from the module's globals (future annotations)
        return lake.lake().root

    monkeypatch.setenv("KAIROS_LAKE_URI", str(tmp_path / "lake-from-env"))
    result = materialize([lake_root], resources={"lake": resources()["lake"]})
    assert result.output_for_node("lake_root") == str(tmp_path / "lake-from-env")
