"""The Dagster definitions load as one graph, and the drift sensor's decision logic."""
from __future__ import annotations

from dagster import AssetKey

from assets.resources import LakeResource
from orchestration.definitions import defs
from orchestration.launch import GRAPH_RUN_DEFAULTS, IN_PROCESS, QUIET_LOGS
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
        assert request.run_config == GRAPH_RUN_DEFAULTS  # the daemon runs it at INFO, in process (as the tests launch it)


def test_dagster_debug_is_off_in_every_launch_path() -> None:
    """The launchpad opens with each job's default run config and the daemon runs what schedules and sensors
    request: all of them set the console logger to INFO (framework DEBUG events were half the demo's lines)."""
    import datetime

    from dagster import DagsterInstance, build_schedule_context

    # drain_stream (an op job) has no default: a dict config on a Dagster 1.13 op job makes execute_in_process
    # ignore its `resources=` overrides; the stream-lag sensor's requests carry QUIET_LOGS instead
    graph_jobs = [j.name for j in defs.resolve_all_job_defs() if not j.name.startswith("__") and j.name != "drain_stream"]
    assert len(graph_jobs) >= 9
    for name in graph_jobs:
        job = defs.resolve_job_def(name)
        config = (job.partitioned_config.get_run_config_for_partition_key("2026-01-05") if job.partitioned_config
                  else job.run_config)
        assert config["loggers"]["console"]["config"]["log_level"] == "INFO", name
    tick = datetime.datetime(2026, 1, 6, 4, 30, tzinfo=datetime.timezone.utc)
    with DagsterInstance.ephemeral() as instance:
        for schedule in defs.get_repository_def().schedule_defs:
            context = build_schedule_context(instance=instance, scheduled_execution_time=tick,
                                             repository_def=defs.get_repository_def())
            requests = schedule.evaluate_tick(context).run_requests
            assert requests and all(r.run_config["loggers"] == QUIET_LOGS["loggers"] for r in requests), schedule.name
            if schedule.job_name == "retrain":  # the daemon runs the training job as the demo and tests launch it
                assert all(r.run_config == GRAPH_RUN_DEFAULTS for r in requests)
    for name in ("build", "retrain", "tune_ranker"):  # one run worker, one Spark session: what the tests launch
        assert defs.resolve_job_def(name).run_config == GRAPH_RUN_DEFAULTS, name
        assert GRAPH_RUN_DEFAULTS["execution"] == IN_PROCESS["execution"]


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
def test_partitions_start_where_the_demo_found_the_data(tmp_path, monkeypatch) -> None:
    """`kairos demo` records the data's first ingest day under KAIROS_HOME; a later process on that home (the
    code server `make ui` starts) draws the daily partitions from it, and KAIROS_PARTITION_START still wins."""
    import os
    import subprocess
    import sys

    from ground.settings import PROJECT_ROOT, Settings

    import argparse

    from orchestration.cli import resolve_demo_world

    monkeypatch.delenv("KAIROS_PARTITION_START", raising=False)
    monkeypatch.setenv("KAIROS_HOME", str(tmp_path / "home"))
    assert Settings.from_env().partition_start == "2026-01-01"
    log = tmp_path / "log.csv"  # a file log from 2025-12-20 on (one export batch: its ingest day is the last)
    log.write_text("uid,sku,ts\n" + "".join(f"u{k % 9},i{k % 13},{1766188800 + k * 4000}\n" for k in range(2000)))
    args = argparse.Namespace(config="", source="file", path=str(log), mapping='{"user": "uid", "item": "sku", '
                              '"timestamp": "ts", "timestamp_unit": "s"}', delimiter="", encoding="", catalog="",
                              catalog_mapping="", users_file="", users_mapping="", users=None, items=None, days=None,
                              seed=None)
    world = resolve_demo_world(args)  # what `kairos demo` does first
    assert world.partition_start != "2026-01-01"
    monkeypatch.delenv("KAIROS_PARTITION_START")  # a later process on the same home has no variable
    assert Settings.from_env().partition_start == world.partition_start
    Settings.from_env().record_partition_start("2025-12-20")
    assert Settings.from_env().partition_start == "2025-12-20"

    def first_ui_partition(**env: str) -> str:
        code = ("from orchestration.definitions import defs\n"
                "print(defs.resolve_job_def('ingest_events').partitions_def.get_first_partition_key())")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **env})
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()[-1]

    assert first_ui_partition() == "2025-12-20"
    assert first_ui_partition(KAIROS_PARTITION_START="2025-12-28") == "2025-12-28"
