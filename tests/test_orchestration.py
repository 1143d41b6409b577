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
def _code_location_view(instance_dir, ticks: list[str]) -> dict:
    """What the UI and the daemon get from a real code location (the gRPC code server `make ui` starts from
    workspace.yaml, in this process's environment): the ingest_events partitions, the bronze_events asset's
    partitions and the daily_ingest schedule's answer at 00:30 UTC of each of `ticks`."""
    import datetime as dt

    from dagster import DagsterInstance, __version__
    from dagster._cli.workspace.cli_target import (WorkspaceOpts, get_code_location_from_workspace,
                                                   get_remote_repository_from_code_location,
                                                   get_workspace_from_cli_opts)
    from dagster._core.definitions.timestamp import TimestampWithTimezone

    from orchestration.launch import WORKSPACE

    instance_dir.mkdir(parents=True, exist_ok=True)
    with DagsterInstance.local_temp(tempdir=str(instance_dir)) as instance, get_workspace_from_cli_opts(
            instance, version=__version__, workspace_opts=WorkspaceOpts(workspace=(str(WORKSPACE),))) as context:
        location = get_code_location_from_workspace(context, None)
        repo = get_remote_repository_from_code_location(location, None)
        names = list(location.get_partition_names_from_repo(repo.handle, "ingest_events").partition_names)
        bronze = next(n for n in repo.get_asset_node_snaps() if n.asset_key.to_user_string() == "bronze_events")
        asset_keys = bronze.partitions.get_partitions_definition().get_partition_keys()
        schedule = {}
        for day in ticks:
            when = dt.datetime.fromisoformat(f"{day}T00:30:00+00:00").timestamp()
            data = location.get_schedule_execution_data(instance, repo.handle, "daily_ingest",
                                                        TimestampWithTimezone(when, "UTC"), None)
            schedule[day] = [r.partition_key for r in data.run_requests or []] or data.skip_message
    return {"job": (names[0], names[-1], len(names)), "asset": (asset_keys[0], asset_keys[-1]), "schedule": schedule}


def test_partitions_are_the_days_the_demo_found_in_the_data(tmp_path, monkeypatch) -> None:
    """`kairos demo` records the data's first and last ingest day under KAIROS_HOME; a later process on that home
    (the code server `make ui` starts) draws the daily partitions between them, not hundreds of empty days up to
    today, and the daily_ingest schedule never asks for a day outside them. KAIROS_PARTITION_START/_END still win;
    KAIROS_PARTITION_END=live (or no end recorded) keeps the live range through today."""
    import argparse
    import datetime as dt

    from ground.settings import Settings
    from orchestration.cli import resolve_demo_world

    for var in ("KAIROS_PARTITION_START", "KAIROS_PARTITION_END"):  # set then unset: restored to absent afterwards
        monkeypatch.setenv(var, "x")
        monkeypatch.delenv(var)
    monkeypatch.setenv("KAIROS_HOME", str(tmp_path / "home"))
    assert (Settings.from_env().partition_start, Settings.from_env().partition_end) == ("2026-01-01", None)
    log = tmp_path / "log.csv"  # a file log from 2025-12-20 on (one export batch: its ingest day is the last)
    log.write_text("uid,sku,ts\n" + "".join(f"u{k % 9},i{k % 13},{1766188800 + k * 4000}\n" for k in range(2000)))
    args = argparse.Namespace(config="", source="file", path=str(log), mapping='{"user": "uid", "item": "sku", '
                              '"timestamp": "ts", "timestamp_unit": "s"}', delimiter="", encoding="", catalog="",
                              catalog_mapping="", users_file="", users_mapping="", users=None, items=None, days=None,
                              seed=None)
    world = resolve_demo_world(args)  # what `kairos demo` does first
    last = world.partition_end
    assert world.partition_start == last == "2026-03-22"  # 2000 events 4000 s apart from 2025-12-20, one batch
    for var in ("KAIROS_PARTITION_START", "KAIROS_PARTITION_END"):
        monkeypatch.delenv(var)  # a later process on the same home has no variable
    assert (Settings.from_env().partition_start, Settings.from_env().partition_end) == (last, last)
    Settings.from_env().record_partition_start("2025-12-20")
    assert Settings.from_env().partition_start == "2025-12-20"

    after = (dt.date.fromisoformat(last) + dt.timedelta(days=1)).isoformat()
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    view = _code_location_view(tmp_path / "dagster", ["2025-12-20", "2025-12-21", after, today])
    assert view["job"] == ("2025-12-20", last, 93) and view["asset"] == ("2025-12-20", last)  # not ..today
    assert view["schedule"]["2025-12-21"] == ["2025-12-20"] and view["schedule"][after] == [last]
    assert "before the first daily partition 2025-12-20" in view["schedule"]["2025-12-20"]
    assert f"after the last daily partition {last}" in view["schedule"][today]  # skipped, not the last day again

    monkeypatch.setenv("KAIROS_PARTITION_START", "2025-12-28")
    monkeypatch.setenv("KAIROS_PARTITION_END", "2026-01-03")
    view = _code_location_view(tmp_path / "dagster", ["2026-01-04", "2026-01-05"])
    assert view["job"] == ("2025-12-28", "2026-01-03", 7)
    assert view["schedule"]["2026-01-04"] == ["2026-01-03"] and "after the last" in view["schedule"]["2026-01-05"]
    monkeypatch.setenv("KAIROS_PARTITION_END", "live")  # a live world: partitions run through today (end_offset=1)
    yesterday = (dt.date.fromisoformat(today) - dt.timedelta(days=1)).isoformat()
    view = _code_location_view(tmp_path / "dagster", [today])
    assert view["job"][:2] == ("2025-12-28", today) and view["schedule"][today] == [yesterday]


def test_the_daily_ingest_tick_asks_for_the_day_that_ended_inside_the_partitions() -> None:
    from orchestration.sensors import ingest_day_due

    keys = ["2026-01-01", "2026-01-02", "2026-01-03"]
    assert ingest_day_due("2026-01-03", keys)[0] == "2026-01-02"  # the day that just ended, not the one just begun
    assert ingest_day_due("2026-01-04", keys)[0] == "2026-01-03"
    day, reason = ingest_day_due("2026-03-01", keys)
    assert day is None and "after the last daily partition 2026-01-03" in reason and "KAIROS_PARTITION_END=live" in reason
    assert ingest_day_due("2026-01-01", keys) == (None, "2025-12-31 is before the first daily partition 2026-01-01")


def test_a_bad_partition_end_fails_naming_the_variable() -> None:
    import pytest

    from assets.ingestion import daily_partitions_def

    assert daily_partitions_def("2026-01-01", "2026-01-03").get_partition_keys() == ["2026-01-01", "2026-01-02",
                                                                                     "2026-01-03"]
    assert daily_partitions_def("2026-01-01", None).end_offset == 1
    with pytest.raises(ValueError, match="KAIROS_PARTITION_END 2025-12-01 is before KAIROS_PARTITION_START"):
        daily_partitions_def("2026-01-01", "2025-12-01")
    with pytest.raises(ValueError, match=r"KAIROS_PARTITION_END \(or KAIROS_HOME/partition_end\) must be a day"):
        daily_partitions_def("2026-01-01", "tomorrow")
