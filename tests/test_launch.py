"""Runs launched the way the UI and the daemon launch them: run launcher, run worker, spawned step processes.

The in-process tests never start a step process; these do, so an import that only breaks in a spawned
child (pyspark's doctest heuristic exiting while Great Expectations loads) fails CI, not the UI.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import redis
from dagster import AssetKey, DagsterEventType, DagsterInstance, RunsFilter

from lake.delta import DeltaLake
from serving.server import log_tail
from streaming.job import COUNTS_KEY, GROUP, STREAM, publish
from tests._env import fresh_home

ROOT = Path(__file__).resolve().parents[1]
SOURCE = {"n_users": 60, "n_items": 80, "n_categories": 4, "days": 3, "seed": 21}


def _python_c(code: str) -> subprocess.CompletedProcess:
    """`python -c`: a main module without __spec__ or __file__, like every multiprocessing spawn child."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)


def test_bare_connect_import_exits_in_a_c_program_and_the_guard_does_not() -> None:
    bare = _python_c("import pyspark.sql.connect.dataframe\nprint('after import')")
    # the root cause, still present in the pinned pyspark: a silent exit(0) with the Connect extras missing
    connect_extras = "google.rpc" in bare.stderr or "grpc" in bare.stderr.lower()
    if connect_extras:
        assert bare.returncode == 0 and "after import" not in bare.stdout, bare.stderr
    guarded = _python_c("from ingestion.simulator import SimulatorConfig, simulate\n"
                        "from data_contracts.events import validate_events\n"
                        "world = simulate(SimulatorConfig(n_users=20, n_items=30, n_categories=3, days=2, seed=3))\n"
                        "result = validate_events(world.events, run_id='c', now_ms=int(world.events.timestamp.max()))\n"
                        "print('validated', result.n_in)")
    assert guarded.returncode == 0, guarded.stderr[-3000:]
    assert "validated" in guarded.stdout and int(guarded.stdout.split()[-1]) > 100, guarded.stdout


def test_ingest_day_launched_through_the_run_launcher_succeeds(tmp_path: Path, redis_server, caplog) -> None:
    """One day of `ingest_events`, multiprocess executor (the UI's default): silver_events imports GX in a
    spawned step process; the run shows under its job and the day's rows reconcile. The caller sees one INFO
    line per finished step with a counter, and the run's console logger is at INFO (Dagster DEBUG off).
    Then the unpartitioned `lake_maintenance_job` the same way, on the tables that run wrote."""
    from orchestration.launch import launch_job

    caplog.set_level(logging.INFO, logger="kairos.launch")
    with fresh_home(tmp_path / "kairos", redis_server.url) as settings:
        day = "2026-01-02"
        with DagsterInstance.get() as instance:
            run = launch_job("ingest_events", {"ops": {"bronze_events": {"config": SOURCE}}},
                             tags={"dagster/partition": day}, instance=instance, timeout_s=800)
            assert run.success, run.failure
            assert {"bronze_events", "silver_events_and_quarantine"} & set(run.steps) or len(run.steps) >= 2
            passed, meta = run.check_evaluations["counts_reconcile"]
            assert passed, meta
            stored = instance.get_run_by_id(run.run_id)
            assert stored.remote_job_origin is not None  # linked to the code location's job (the UI's job page)
            assert stored.remote_job_origin.location_name == "kairos"
            assert [r.run_id for r in instance.get_runs(RunsFilter(job_name="ingest_events"))] == [run.run_id]
            assert stored.tags["dagster/partition"] == day
            counted = [m for r in caplog.records if (m := re.fullmatch(r"\[(\d+)/(\d+)\] (\S+)( FAILED)? \.\.\. \d+ s",
                                                                       r.getMessage()))]
            assert [int(m[1]) for m in counted] == list(range(1, len(run.steps) + 1)), caplog.text[-2000:]
            assert {m[3] for m in counted} == set(run.steps) and not any(m[4] for m in counted)
            assert int(counted[-1][2]) == len(run.steps)  # "[2/2] ...": the counter knows the run's step count
            assert stored.run_config["loggers"]["console"]["config"]["log_level"] == "INFO"
            maintenance = launch_job("lake_maintenance_job", instance=instance, timeout_s=800)
            assert maintenance.success, maintenance.failure
            assert instance.get_run_by_id(maintenance.run_id).remote_job_origin is not None
            materialized = instance.get_latest_materialization_event(AssetKey("lake_maintenance"))
            assert materialized.run_id == maintenance.run_id
            assert materialized.asset_materialization.metadata["tables"].value >= 3  # bronze, silver, quarantine
        lake = DeltaLake(settings.lake_uri)
        bronze, silver, quarantine = lake.read("bronze_events"), lake.read("silver_events"), lake.read("quarantine_events")
        assert set(bronze["ingest_date"]) == {day}
        assert len(bronze) == len(silver) + len(quarantine) and len(silver) > 0


def _wait_for_queue_daemon(instance: DagsterInstance, daemon: subprocess.Popen, timeout_s: float = 300) -> None:
    """Submit only once the daemon's run-queue thread heartbeats: a daemon that died or never came up fails here
    with its own log, not as a run that sits QUEUED until the launch times out."""
    import time

    from orchestration.launch import _queue_daemon_alive

    deadline = time.monotonic() + timeout_s
    while not _queue_daemon_alive(instance, within_s=120):
        assert daemon.poll() is None, f"dagster-daemon exited with {daemon.returncode}:\n{log_tail(daemon)}"
        assert time.monotonic() < deadline, f"no run-queue heartbeat after {timeout_s:.0f} s:\n{log_tail(daemon)}"
        time.sleep(1)


def test_a_queued_run_is_launched_by_the_daemon(tmp_path: Path, redis_server) -> None:
    """What the UI's Launch button and the sensors do under `dagster dev`: the run goes to the instance's
    QueuedRunCoordinator and a real `dagster-daemon` dequeues it, launches it and it succeeds (lake maintenance,
    then the op job `drain_stream`)."""
    import signal

    import pandas as pd

    from orchestration.launch import WORKSPACE, launch_job

    with fresh_home(tmp_path / "kairos", redis_server.url) as settings:
        lake = DeltaLake(settings.lake_uri)
        lake.write_batch("item_features", pd.DataFrame({"item_id": ["i1", "i2"], "ingest_date": ["2026-01-02"] * 2}),
                         batch_id="2026-01-02", replace_where="ingest_date = '2026-01-02'")  # a table drain_stream leaves alone
        daemon_log = tmp_path / "daemon.log"
        daemon = subprocess.Popen([str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", str(WORKSPACE)],
                                  cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                                  stdout=daemon_log.open("wb"), stderr=subprocess.STDOUT)
        daemon.log_path = daemon_log  # type: ignore[attr-defined]  # what serving.server.log_tail reads
        try:
            with DagsterInstance.get() as instance:
                assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
                _wait_for_queue_daemon(instance, daemon)
                try:
                    run = launch_job("lake_maintenance_job", instance=instance, timeout_s=400, queued=True)
                except (RuntimeError, TimeoutError) as exc:  # what the daemon said, beside what launch_job saw
                    raise AssertionError(f"{exc}\n--- dagster-daemon log tail ---\n{log_tail(daemon)}") from exc
                assert run.success, run.failure
                stored = instance.get_run_by_id(run.run_id)
                assert stored.remote_job_origin is not None and stored.job_name == "lake_maintenance_job"
                event = instance.get_latest_materialization_event(AssetKey("lake_maintenance"))
                assert event.run_id == run.run_id
                assert event.asset_materialization.metadata["tables"].value == 1
                # the job the stream-lag sensor requests, the same way: the real consumer drains a real stream
                client = redis.Redis.from_url(redis_server.url, decode_responses=True)
                client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
                publish(client, [{"event_id": f"q{k}", "user_id": f"u{k % 5}", "item_id": f"i{k % 9}",
                                  "event_type": "click", "timestamp": 1_767_225_600_000 + k,
                                  "session_id": f"s{k % 5}", "schema_version": 1} for k in range(40)])
                try:
                    drain = launch_job("drain_stream", {"ops": {"consume_stream": {"config": {
                        "max_seconds": 120, "bronze_window_ms": 200, "reclaim_idle_ms": 1000}}}},
                        instance=instance, timeout_s=400, queued=True)
                except (RuntimeError, TimeoutError) as exc:
                    raise AssertionError(f"{exc}\n--- dagster-daemon log tail ---\n{log_tail(daemon)}") from exc
                assert drain.success, drain.failure
                assert client.hgetall(COUNTS_KEY) == {"applied": "40"}
                assert len(lake.read("bronze_events")) == 40  # the dual write's own process, under the step process
        finally:
            os.killpg(daemon.pid, signal.SIGTERM)  # the daemon and the code server it started, by its group id
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait(timeout=30)


def test_a_queued_run_without_a_daemon_says_what_to_start(tmp_path: Path, redis_server, monkeypatch) -> None:
    """Submitted to the queue with no `dagster-daemon` running, the run can never be dequeued: launch_job fails
    after the grace period naming the missing daemon and how to start it, instead of waiting out its timeout."""
    import pytest

    from orchestration import launch

    monkeypatch.setattr(launch, "DAEMON_GRACE_S", 5.0)
    with fresh_home(tmp_path / "kairos", redis_server.url):
        with DagsterInstance.get() as instance:
            with pytest.raises(RuntimeError, match=r"still QUEUED .* no dagster-daemon .*`dagster-daemon run -w workspace.yaml`"):
                launch.launch_job("lake_maintenance_job", instance=instance, timeout_s=300, queued=True)
            [run] = instance.get_runs()
            assert run.status.value == "QUEUED" and run.job_name == "lake_maintenance_job"


MULTIPROCESS = {"execution": {"config": {"multiprocess": {"max_concurrent": 2}}}}
BUILD_WORLD = {"source": "simulator", "n_users": 150, "n_items": 200, "days": 10, "seed": 3}  # test_end_to_end's


def test_the_build_succeeds_under_the_multiprocess_executor(tmp_path: Path, redis_server) -> None:
    """The training jobs default to the in-process executor (GRAPH_RUN_DEFAULTS); a user who picks the multiprocess
    executor in the launchpad gets one spawned process per step (its own code-location load, Spark session and
    pickled inputs). The whole `build` launched that way through the run launcher succeeds on a small world:
    every step in its own worker process, none of them exiting on pyspark's Spark Connect check, the model
    registered with its checks (about 1.5 min)."""
    from assets.ingestion import SourceConfig, source_partitions
    from orchestration.launch import IN_PROCESS, launch_job

    with fresh_home(tmp_path / "kairos", redis_server.url):
        days = source_partitions(SourceConfig(**BUILD_WORLD))
        with DagsterInstance.get() as instance:
            ingest = launch_job("ingest_events", {**IN_PROCESS, "ops": {"bronze_events": {"config": BUILD_WORLD}}},
                                tags={"dagster/asset_partition_range_start": days[0],
                                      "dagster/asset_partition_range_end": days[-1]}, instance=instance, timeout_s=800)
            assert ingest.success, ingest.failure
            build = launch_job("build", {**MULTIPROCESS, "ops": {"catalog": {"config": BUILD_WORLD}}},
                               instance=instance, timeout_s=1500)
            assert build.success, build.failure
            assert instance.get_run_by_id(build.run_id).run_config["execution"] == MULTIPROCESS["execution"]
            workers = instance.all_logs(build.run_id, of_type=DagsterEventType.STEP_WORKER_STARTED)
            assert {e.dagster_event.step_key for e in workers} == set(build.steps)  # one process per step
            assert {"training_set", "ranker_model", "model_evaluation", "registered_model"} <= set(build.steps)
            assert {"point_in_time_correct", "index_recall", "gate_passed"} <= set(build.check_evaluations)
            registered = instance.get_latest_materialization_event(AssetKey("registered_model"))
            assert registered is not None and registered.run_id == build.run_id
