"""Launch Dagster jobs the way the UI and the daemon do: through the instance's run launcher.

`execute_in_process` runs a job inside the caller: its runs are not linked to the job of the code
location (the UI's job page says "No runs found") and nothing exercises the subprocesses a UI launch
starts (a run worker, then one spawned process per step under the multiprocess executor) — which is
how `SystemExit: 0` in `silver_events` went unseen. `launch_job` loads `workspace.yaml` in a gRPC code
server, creates the run from the code location's job (so it shows under that job), hands it to
`instance.launch_run` (the DefaultRunLauncher: what the daemon's run queue calls) and follows the run
in the event log, logging each finished step with a counter ("[4/12] training_set ... 35 s").
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ground.settings import PROJECT_ROOT

log = logging.getLogger("kairos.launch")

WORKSPACE = PROJECT_ROOT / "workspace.yaml"
IN_PROCESS: dict[str, Any] = {"execution": {"config": {"in_process": {}}}}  # one run worker, one Spark session for all steps
# Dagster's console logger prints every framework event at DEBUG (half of the demo's lines): INFO by default, in
# the demo's launches, as every job's default run config (the UI launchpad) and in every schedule and sensor request
# (the daemon; a run config there replaces the job's default)
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
# the graph jobs that train (build, retrain, tune_ranker): their steps share one run worker and one Spark session
# (13 Spark sessions and 13 model-pickle round trips otherwise). Their default run config, and what the schedules and
# sensors that start them request, so a UI or daemon launch runs exactly what the demo and tests launch.
GRAPH_RUN_DEFAULTS = {**QUIET_LOGS, **IN_PROCESS}


@dataclass
class LaunchedRun:
    """What a launched run ended as; `check_evaluations` maps check name -> (passed, metadata values)."""

    run_id: str
    job_name: str
    status: str
    seconds: float
    steps: list[str] = field(default_factory=list)
    check_evaluations: dict[str, tuple[bool, dict[str, Any]]] = field(default_factory=dict)
    failure: str = ""

    @property
    def success(self) -> bool:
        return self.status == "SUCCESS"


def _failure_message(instance: Any, run_id: str) -> str:
    """The first failed step's error (or the run failure's message), for a message that says what broke."""
    from dagster import DagsterEventType

    for record in instance.all_logs(run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE}):
        event = record.dagster_event
        data = getattr(event, "event_specific_data", None)
        error = getattr(data, "error", None)
        text = error.to_string() if error is not None else (event.message or "")
        return f"{event.step_key or 'run'}: {text.strip()[-2000:]}"
    return ""


def _check_evaluations(instance: Any, run_id: str) -> dict[str, tuple[bool, dict[str, Any]]]:
    from dagster import DagsterEventType

    out: dict[str, tuple[bool, dict[str, Any]]] = {}
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = record.dagster_event.event_specific_data
        out[evaluation.check_name] = (bool(evaluation.passed),
                                      {k: getattr(v, "value", v) for k, v in evaluation.metadata.items()})
    return out


# how long a submitted run may stay QUEUED with no run-queue daemon heartbeating before launch_job says so
DAEMON_GRACE_S = 180.0


def _queue_daemon_alive(instance: Any, within_s: float) -> bool:
    """True when a `dagster-daemon` serving this instance's run queue sent a heartbeat in the last `within_s`."""
    heartbeats = instance.get_daemon_heartbeats()
    beat = heartbeats.get("QUEUED_RUN_COORDINATOR")
    return beat is not None and time.time() - beat.timestamp <= within_s


def _follow(instance: Any, run_id: str, n_steps: int, started: float, timeout_s: float) -> list[str]:
    """Poll the run's event log until it finishes; log each finished step with a counter and its seconds.

    A run that stays QUEUED while no run-queue daemon heartbeats fails after DAEMON_GRACE_S with what to start,
    instead of waiting out `timeout_s` for a dequeue that cannot come."""
    from dagster import DagsterEventType, DagsterRunStatus
    from dagster._core.storage.dagster_run import FINISHED_STATUSES

    done: list[str] = []
    step_started: dict[str, float] = {}
    seen = 0
    while True:
        entries = instance.all_logs(run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS,
                                                     DagsterEventType.STEP_FAILURE})
        for record in entries[seen:]:  # ordered by storage id: only the new ones
            event = record.dagster_event
            if event.event_type == DagsterEventType.STEP_START:
                step_started[event.step_key] = record.timestamp
                continue
            done.append(event.step_key)
            took = record.timestamp - step_started.get(event.step_key, record.timestamp)
            verdict = "" if event.event_type == DagsterEventType.STEP_SUCCESS else " FAILED"
            log.info("[%d/%d] %s%s ... %.0f s", len(done), n_steps, event.step_key, verdict, took)
        seen = len(entries)
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status in FINISHED_STATUSES:
            return done
        waited = time.perf_counter() - started
        if (run is not None and run.status == DagsterRunStatus.QUEUED and waited > DAEMON_GRACE_S
                and not _queue_daemon_alive(instance, DAEMON_GRACE_S)):
            raise RuntimeError(f"Dagster run {run_id} still QUEUED after {waited:.0f} s and no dagster-daemon has "
                               f"served this instance's run queue (DAGSTER_HOME={getattr(instance, 'root_directory', '?')}) "
                               f"in the last {DAEMON_GRACE_S:.0f} s: start one (`make ui` runs `dagster dev`, or "
                               f"`dagster-daemon run -w workspace.yaml`) or launch without the queue")
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError(f"Dagster run {run_id} still {run.status.value if run else 'unknown'} after "
                               f"{timeout_s:.0f} s: look at it in the UI (`make ui`), Runs tab")
        time.sleep(0.5)


def launch_job(job_name: str, run_config: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None,
               *, instance: Any = None, workspace: Path = WORKSPACE, timeout_s: float = 3600.0,
               raise_on_failure: bool = True, queued: bool = False) -> LaunchedRun:
    """Create a run of `job_name` from the workspace's code location, launch it with the instance's run
    launcher and wait for it; raises RuntimeError naming the failed step unless `raise_on_failure=False`.

    `queued=True` submits it to the instance's run coordinator instead, as the UI's Launch button and the
    sensors do: under `dagster dev` (QueuedRunCoordinator) a running `dagster-daemon` dequeues and launches it."""
    from dagster import DagsterInstance, __version__
    from dagster._cli.job import _create_run
    from dagster._cli.workspace.cli_target import (WorkspaceOpts, get_code_location_from_workspace,
                                                   get_remote_job_from_remote_repo,
                                                   get_remote_repository_from_code_location,
                                                   get_workspace_from_cli_opts)

    instance = instance or DagsterInstance.get()
    started = time.perf_counter()
    run_id = str(uuid.uuid4())
    log.info("launching Dagster job %s (run %s) through the run launcher", job_name, run_id)
    with get_workspace_from_cli_opts(instance, version=__version__,
                                     workspace_opts=WorkspaceOpts(workspace=(str(workspace),))) as context:
        location = get_code_location_from_workspace(context, None)
        repo = get_remote_repository_from_code_location(location, None)
        remote_job = get_remote_job_from_remote_repo(repo, job_name)
        run = _create_run(instance=instance, code_location=location, remote_repo=repo, remote_job=remote_job,
                          run_config={**QUIET_LOGS, **(run_config or {})}, tags=dict(tags or {}), op_selection=None, run_id=run_id)
        n_steps = len(run.step_keys_to_execute or []) or len(remote_job.node_names)
        if queued:
            instance.submit_run(run.run_id, context)
        else:
            instance.launch_run(run.run_id, context)
        steps = _follow(instance, run_id, n_steps, started, timeout_s)  # keep the code server up until it ends
    final = instance.get_run_by_id(run_id)
    outcome = LaunchedRun(run_id=run_id, job_name=job_name, status=final.status.value,
                          seconds=time.perf_counter() - started, steps=steps,
                          check_evaluations=_check_evaluations(instance, run_id))
    if not outcome.success:
        outcome.failure = _failure_message(instance, run_id)
        if raise_on_failure:
            raise RuntimeError(f"Dagster run {run_id} of {job_name} ended {outcome.status}: {outcome.failure}\n"
                               f"Open it in the UI (`make ui`, Runs tab) for the full logs.")
    return outcome
