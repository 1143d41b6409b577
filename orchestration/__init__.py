"""Kairos: orchestration (the one Definitions, jobs, sensors, resources, the CLI).

Set before anything imports dagster (its gRPC client binds the timeout at import): a run launched through
the run launcher asks the code server to start it, and on a busy 2-core machine that call once took longer
than Dagster's 60 s default (`DagsterUserCodeUnreachableError`). Override with DAGSTER_GRPC_TIMEOUT_SECONDS.
"""
import os as _os

_os.environ.setdefault("DAGSTER_GRPC_TIMEOUT_SECONDS", "600")
