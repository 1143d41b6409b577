"""The Dagster launchpad's config schema, printed as JSON so two commits can be diffed (issue 18: the Configs
generated from the product's dataclasses must show the launchpad the hand-written classes did).

    PYTHONPATH=. .venv/bin/python tools/config_schema.py > after.json   # and on the other commit: before.json

Per `Config` class of the assets package: its pydantic JSON schema (field order, types, defaults, description)
and Dagster's field snapshot (type key, required, default, description); per job of the definitions: the run
config schema Dagster builds from them (every asset's op config, keyed by op).
"""
from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's packages, not bench/streaming.py


def _fields(config_type: Any) -> list[list[Any]]:
    from dagster._config.snap import snap_from_config_type

    snap = snap_from_config_type(config_type)
    return [[f.name, f.type_key, f.is_required, f.default_value_as_json_str, f.description] for f in snap.fields or []]


def config_classes() -> dict[str, Any]:
    """Every Config (and configurable resource) class defined in assets/, with its two schemas."""
    import assets
    from dagster import Config

    out: dict[str, Any] = {}
    for info in pkgutil.iter_modules(assets.__path__):
        module = importlib.import_module(f"assets.{info.name}")
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, Config) and obj is not Config and obj.__module__ == module.__name__:
                out[f"{module.__name__}:{name}"] = {"json": obj.model_json_schema(),
                                                    "dagster_fields": _fields(obj.to_config_schema().config_type)}
    return out


def job_schemas() -> dict[str, Any]:
    """Each job's op config fields (what the launchpad offers for a run of it)."""
    from dagster import Definitions

    from orchestration.definitions import defs

    repo = Definitions.validate_loadable(defs) or defs.get_repository_def()
    out: dict[str, Any] = {}
    for job in repo.get_all_jobs():
        ops = job.run_config_schema.config_type.fields.get("ops")
        if ops is None:
            continue
        out[job.name] = {op: _fields(field.config_type.fields["config"].config_type)
                         for op, field in sorted(ops.config_type.fields.items())
                         if "config" in getattr(field.config_type, "fields", {})}
    return out


if __name__ == "__main__":
    json.dump({"configs": config_classes(), "jobs": job_schemas()}, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
