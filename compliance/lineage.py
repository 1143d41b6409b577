"""Lineage of a registered model version: which data, code, checks and people produced it.

DESIGN invariant 7 ("traceable") as a document: for one MLflow model version it gathers the
training run (params, metrics, tags, evaluation.json, gate.json), the Dagster runs (the
training run's asset materializations with their code and data versions, and the runs that
produced each Delta table version the training read, with their asset checks: the data
contract results), the Delta table versions and row counts read, the feature registry
version, the git SHA, and every promotion (who/what moved which alias, when, why).

    collect_inputs(settings, version)  -> raw inputs (adapters: MLflow, Dagster instance, Delta)
    build_lineage(**inputs)            -> the lineage dict (pure: same inputs, same document)
    render_html(lineage)               -> one self-contained, escaped HTML page
    lineage_gaps(lineage)              -> what it cannot account for (the `lineage_complete` asset check)
    publish_lineage(settings, version) -> lineage.json + lineage.html logged on the MLflow run,
                                          tag `lineage.uri` on the version
    request_lineage(settings, request_id) -> the served request, its model version and its lineage

The Dagster instance is the one under DAGSTER_HOME (`kairos` sets KAIROS_HOME/dagster).
"""
from __future__ import annotations

import datetime as dt
import html
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ground.settings import Settings

log = logging.getLogger("kairos.lineage")

SCHEMA = "kairos.lineage/1"
LINEAGE_DIR = "lineage"
LINEAGE_TAG = "lineage.uri"
DELTA_TAG_PREFIX = "delta."
CONTRACT_ASSETS = ("silver_events", "quarantine_events")


# ---------------------------------------------------------------------------------------------- pure
def _iso(ms: Any) -> str | None:
    try:
        return dt.datetime.fromtimestamp(int(ms) / 1000, tz=dt.timezone.utc).isoformat(timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def delta_pins(tags: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """{table: {"version": v, "rows": n}} from the `delta.<table>.version/rows` tags of a model version."""
    pins: dict[str, dict[str, int]] = {}
    for key, value in tags.items():
        if not key.startswith(DELTA_TAG_PREFIX):
            continue
        table, _, field = key[len(DELTA_TAG_PREFIX):].rpartition(".")
        if field in ("version", "rows") and table:
            try:
                pins.setdefault(table, {})[field] = int(value)
            except ValueError:
                continue
    return pins


def promotions(tags: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every `promoted.<alias>.at/by/reason` tag as one event, oldest first."""
    events: dict[str, dict[str, Any]] = {}
    for key, value in tags.items():
        if not key.startswith("promoted."):
            continue
        alias, _, field = key[len("promoted."):].rpartition(".")
        if alias and field in ("at", "by", "reason"):
            events.setdefault(alias, {"alias": alias})[field] = value
    out = []
    for e in events.values():
        at = e.get("at")
        out.append({"alias": e["alias"], "at_ms": int(str(at)) if str(at).isdigit() else None, "at": _iso(at),
                    "by": e.get("by"), "reason": e.get("reason")})
    return sorted(out, key=lambda e: (e["at_ms"] or 0, e["alias"]))


def producing_materialization(materializations: list[dict[str, Any]], table: str, version: int,
                              written_by_run: str | None = None) -> dict | None:
    """The materialization of `table` that wrote the Delta version read.

    The Delta commit names its run (`run_id` in the commit's custom metadata): that run's materialization when
    known. Otherwise the *first* materialization that reported this version: a later replay of an unchanged day
    writes no new version and reports the same one, and crediting it (the latest) named a failed no-op replay as
    the writer. With no exact match, the newest one below the version."""
    rows = [m for m in materializations if m.get("asset") == table and isinstance(m.get("delta_version"), int)]
    exact = [m for m in rows if m["delta_version"] == version]
    if written_by_run:
        by_writer = [m for m in exact if m.get("run_id") == written_by_run]
        if by_writer:
            return min(by_writer, key=lambda m: m.get("timestamp") or 0)
    if exact:
        return min(exact, key=lambda m: m.get("timestamp") or 0)
    below = [m for m in rows if m["delta_version"] <= version]
    return max(below, key=lambda m: (m["delta_version"], -(m.get("timestamp") or 0))) if below else None


def build_lineage(model_version: Mapping[str, Any], run: Mapping[str, Any], artifacts: Mapping[str, Any],
                  dagster: Mapping[str, Any], delta: Mapping[str, Mapping[str, Any]],
                  registered_model_tags: Mapping[str, str] | None = None,
                  feature_registry_now: str | None = None, generated_at_ms: int | None = None) -> dict[str, Any]:
    """The lineage document of one model version from plain inputs (see collect_inputs for their shape)."""
    tags = dict(model_version.get("tags") or {})
    pins = delta_pins(tags)
    materializations = list(dagster.get("materializations") or [])
    checks = list(dagster.get("checks") or [])
    training_run_id = tags.get("dagster.run_id")
    tables: dict[str, Any] = {}
    for table, pin in sorted(pins.items()):
        info = dict(delta.get(table) or {})
        produced = producing_materialization(materializations, table, pin.get("version", -1),
                                             info.get("written_by_run"))
        tables[table] = {
            "version": pin.get("version"), "rows": pin.get("rows"),
            "committed_at": info.get("committed_at"), "operation": info.get("operation"),
            "current_version": info.get("current_version"),
            "time_travel": info.get("time_travel", "unknown"),
            "produced_by_run": info.get("written_by_run") or (produced.get("run_id") if produced else None),
            "data_version": produced.get("data_version") if produced else None,
            "code_version": produced.get("code_version") if produced else None,
        }
    data_runs = sorted({t["produced_by_run"] for t in tables.values() if t["produced_by_run"]})
    contract_runs = {t["produced_by_run"] for name, t in tables.items() if name in CONTRACT_ASSETS and t["produced_by_run"]}
    contracts = [c for c in checks if c.get("asset") in CONTRACT_ASSETS and c.get("run_id") in contract_runs]
    training_assets = [m for m in materializations if m.get("run_id") == training_run_id]
    asset_versions: dict[str, dict[str, Any]] = {}
    for m in sorted(materializations, key=lambda m: m.get("timestamp") or 0):
        if m.get("run_id") in (training_run_id, *data_runs):
            asset_versions[m["asset"]] = {"run_id": m["run_id"], "code_version": m.get("code_version"),
                                          "data_version": m.get("data_version"), "partition": m.get("partition"),
                                          "at": _iso((m.get("timestamp") or 0) * 1000)}
    gate = dict(artifacts.get("gate.json") or {})
    evaluation = artifacts.get("evaluation.json") or {}
    rollout = {k: v for k, v in (registered_model_tags or {}).items() if k.startswith("rollout.")}
    registry_version = tags.get("feature_registry.version")
    return {
        "schema": SCHEMA,
        "generated_at": _iso(generated_at_ms),
        "model": {"name": model_version.get("name"), "version": str(model_version.get("version")),
                  "run_id": model_version.get("run_id"), "created_at": _iso(model_version.get("creation_timestamp")),
                  "aliases": sorted(model_version.get("aliases") or []),
                  "bundle_manifest_sha256": tags.get("bundle.manifest_sha256"), "source": model_version.get("source")},
        "code": {"git_sha": tags.get("git.sha"), "feature_registry_version": registry_version,
                 "feature_registry_version_now": feature_registry_now,
                 "feature_registry_changed_since": (feature_registry_now is not None and registry_version is not None
                                                    and feature_registry_now != registry_version),
                 "asset_code_versions": {a: v["code_version"] for a, v in sorted(asset_versions.items())}},
        "dagster": {"training_run": dict(dagster.get("run") or {"run_id": training_run_id}),
                    "data_runs": data_runs, "assets": dict(sorted(asset_versions.items())),
                    "training_run_assets": sorted({m["asset"] for m in training_assets})},
        "data": {"tables": tables},
        "contracts": contracts,
        "training": {"params": dict(run.get("params") or {}), "metrics": dict(sorted((run.get("metrics") or {}).items())),
                     "mlflow_run_id": run.get("run_id"), "started_at": _iso(run.get("start_time")),
                     "ended_at": _iso(run.get("end_time"))},
        "evaluation": {k: v for k, v in evaluation.items() if isinstance(v, dict) and k in
                       ("two_stage", "popularity", "logistic_regression", "two_tower", "champion")},
        "gate": {"passed": gate.get("passed", tags.get("gate.passed") == "True"),
                 "reasons": list(gate.get("reasons") or [r for r in tags.get("gate.reasons", "").split(" | ") if r]),
                 "checks": gate.get("checks") or {}},
        "promotions": promotions(tags),
        "rollout": rollout,
    }


REQUIRED_CONTRACTS = (("silver_events", "events_contract"), ("silver_events", "counts_reconcile"))


def lineage_gaps(lineage: Mapping[str, Any]) -> list[str]:
    """What a lineage cannot account for (empty = complete): data read that no recorded run produced, the
    data contract results of the silver version read, the code version, the registry version, the gate."""
    gaps: list[str] = []
    tables = lineage.get("data", {}).get("tables", {})
    if not tables:
        gaps.append("no Delta table versions recorded on the model version (delta.<table>.version tags)")
    for table, info in tables.items():
        if not info.get("produced_by_run"):
            gaps.append(f"{table} v{info.get('version')}: no Dagster materialization in the instance wrote it")
    found = {(c.get("asset"), c.get("check")) for c in lineage.get("contracts", [])}
    if "silver_events" in tables:
        gaps += [f"no {check} result for the {asset} version read" for asset, check in REQUIRED_CONTRACTS
                 if (asset, check) not in found]
    code = lineage.get("code", {})
    if code.get("git_sha") in (None, "", "unknown"):
        gaps.append("git SHA unknown (not built from a git checkout)")
    if not code.get("feature_registry_version"):
        gaps.append("feature registry version missing")
    if not lineage.get("gate", {}).get("reasons"):
        gaps.append("no gate verdict recorded")
    return gaps


def _cell(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f"<pre>{html.escape(json.dumps(value, indent=1, sort_keys=True, default=str))}</pre>"
    return html.escape("" if value is None else str(value))


def _table(rows: Sequence[Mapping[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "<p class='empty'>none recorded</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv(mapping: Mapping[str, Any]) -> str:
    return _table([{"key": k, "value": v} for k, v in mapping.items()], ["key", "value"])


def render_html(lineage: Mapping[str, Any]) -> str:
    """One self-contained HTML page (inline CSS, no scripts, every value escaped)."""
    m = lineage.get("model", {})
    title = f"Lineage of {m.get('name')} version {m.get('version')}"
    gate = lineage.get("gate", {})
    verdict = "PASSED" if gate.get("passed") else "FAILED"
    tables = [{"table": t, **v} for t, v in lineage.get("data", {}).get("tables", {}).items()]
    assets = [{"asset": a, **v} for a, v in lineage.get("dagster", {}).get("assets", {}).items()]
    metrics = [{"model": k, **{mk: mv for mk, mv in v.items() if isinstance(mv, (int, float))}}
               for k, v in lineage.get("evaluation", {}).items()]
    metric_cols = ["model"] + sorted({c for r in metrics for c in r if c != "model"})[:10]
    sections = [
        ("Model", _kv({**m, "generated_at": lineage.get("generated_at")})),
        ("Code", _kv({k: v for k, v in lineage.get("code", {}).items() if k != "asset_code_versions"})),
        ("Promotions (who / what moved an alias, when, why)",
         _table(lineage.get("promotions", []), ["alias", "at", "by", "reason"])
         + (_kv(lineage["rollout"]) if lineage.get("rollout") else "")),
        (f"Gate: {verdict}", "<ul>" + "".join(f"<li>{html.escape(str(r))}</li>" for r in gate.get("reasons", []))
         + "</ul>"),
        ("Delta tables read (pinned versions)",
         _table(tables, ["table", "version", "rows", "committed_at", "operation", "produced_by_run", "data_version",
                         "code_version", "current_version", "time_travel"])),
        ("Data contracts (asset checks of the runs that produced the data)",
         _table(lineage.get("contracts", []), ["asset", "check", "passed", "severity", "run_id", "metadata"])),
        ("Dagster runs and asset versions",
         _kv({"training run": lineage.get("dagster", {}).get("training_run"),
              "data runs": lineage.get("dagster", {}).get("data_runs")})
         + _table(assets, ["asset", "run_id", "code_version", "data_version", "partition", "at"])),
        ("Training parameters", _kv(lineage.get("training", {}).get("params", {}))),
        ("Evaluation (test window)", _table(metrics, metric_cols)),
        ("Training metrics (MLflow)", _kv(lineage.get("training", {}).get("metrics", {}))),
    ]
    body = "".join(f"<section><h2>{html.escape(h)}</h2>{content}</section>" for h, content in sections)
    style = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top;font-size:13px}"
             "th{background:#f3f3f3}pre{margin:0;font-size:12px;white-space:pre-wrap}.empty{color:#888}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def summary(lineage: Mapping[str, Any]) -> str:
    """A few lines for a terminal."""
    m, code, gate = lineage["model"], lineage["code"], lineage["gate"]
    lines = [f"{m['name']} version {m['version']} (aliases: {', '.join(m['aliases']) or 'none'}; "
             f"created {m['created_at']}; MLflow run {m['run_id']})",
             f"  code: git {code['git_sha']}, feature registry {code['feature_registry_version']}"
             + (" (changed since)" if code.get("feature_registry_changed_since") else ""),
             f"  dagster: training run {lineage['dagster']['training_run'].get('run_id')}, "
             f"data runs {', '.join(lineage['dagster']['data_runs']) or 'unknown'}",
             f"  gate: {'PASSED' if gate['passed'] else 'FAILED'}"]
    lines += [f"    - {r}" for r in gate["reasons"]]
    lines.append("  data read:")
    for t, v in lineage["data"]["tables"].items():
        lines.append(f"    {t:<20} v{v['version']:<5} {v['rows']} rows  (run {v['produced_by_run']}, "
                     f"data version {v['data_version']})")
    lines.append("  contracts:")
    for c in lineage["contracts"]:
        lines.append(f"    {c['asset']}.{c['check']}: {'passed' if c['passed'] else 'FAILED'} (run {c['run_id']})")
    lines.append("  promotions:")
    for p in lineage["promotions"]:
        lines.append(f"    {p['alias']} at {p['at']} by {p['by']}: {p['reason']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- adapters
def _plain(value: Any) -> Any:
    """A Dagster metadata value (or anything) as JSON-able data."""
    value = getattr(value, "value", value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def dagster_instance(settings: Settings) -> Any:
    """The instance under DAGSTER_HOME (KAIROS_HOME/dagster unless set), the one `kairos` runs write to; opened
    from its folder, so the process environment is left as it was (only the CLI sets DAGSTER_HOME)."""
    from dagster import DagsterInstance

    if os.environ.get("DAGSTER_HOME"):
        return DagsterInstance.get()
    home = settings.home / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").touch(exist_ok=True)
    return DagsterInstance.from_config(str(home))


def _materialization(record: Any) -> dict[str, Any]:
    """An event-log record (or entry) of an asset materialization as plain data."""
    mat = record.asset_materialization
    tags = mat.tags or {}
    meta = {k: _plain(v) for k, v in (mat.metadata or {}).items()}
    version = meta.get("delta_version")
    return {"asset": mat.asset_key.to_user_string(), "run_id": record.run_id, "timestamp": record.timestamp,
            "partition": mat.partition, "data_version": tags.get("dagster/data_version"),
            "code_version": tags.get("dagster/code_version"),
            "delta_version": int(version) if isinstance(version, (int, float)) and not isinstance(version, bool) else None,
            "rows": meta.get("rows")}


def collect_dagster(instance: Any, training_run_id: str | None, tables: list[str], limit: int = 200) -> dict[str, Any]:
    """Materializations of the training run and of each pinned table (recent `limit`), and the asset check
    evaluations of the runs involved."""
    from dagster import AssetKey, DagsterEventType

    mats: dict[tuple, dict[str, Any]] = {}
    run_info: dict[str, Any] = {"run_id": training_run_id}
    if training_run_id:
        run = instance.get_run_by_id(training_run_id)
        if run is not None:
            stats = instance.get_run_stats(training_run_id)
            run_info = {"run_id": training_run_id, "job": run.job_name, "status": run.status.value,
                        "started_at": _iso((stats.start_time or 0) * 1000) if stats.start_time else None,
                        "ended_at": _iso((stats.end_time or 0) * 1000) if stats.end_time else None}
            for entry in instance.all_logs(training_run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION):
                m = _materialization(entry)
                mats[(m["run_id"], m["asset"], m["partition"], m["timestamp"])] = m
    for table in tables:
        for record in instance.fetch_materializations(AssetKey(table), limit=limit).records:
            m = _materialization(record)
            mats[(m["run_id"], m["asset"], m["partition"], m["timestamp"])] = m
    runs = {m["run_id"] for m in mats.values()}
    checks = []
    for run_id in sorted(runs):
        for entry in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION):
            ev = entry.dagster_event.event_specific_data
            checks.append({"asset": ev.asset_key.to_user_string(), "check": ev.check_name, "passed": bool(ev.passed),
                           "severity": getattr(ev.severity, "value", str(ev.severity)), "run_id": run_id,
                           "metadata": {k: _plain(v) for k, v in (ev.metadata or {}).items()}})
    return {"run": run_info, "materializations": list(mats.values()), "checks": checks}


def collect_delta(settings: Settings, pins: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, Any]]:
    """Commit time and operation of each pinned version, the table's current version, and whether the pinned
    version can still be read (vacuum and right-to-be-forgotten purges remove old files)."""
    from lake.delta import DeltaLake

    lake = DeltaLake(settings.lake_uri)
    out: dict[str, dict[str, Any]] = {}
    for table, pin in pins.items():
        info: dict[str, Any] = {}
        if not lake.exists(table):
            out[table] = {"time_travel": "table gone"}
            continue
        info["current_version"] = lake.version(table)
        version = pin.get("version")
        if version is None:  # only a row count was tagged: there is no version to time-travel to
            info["time_travel"] = "unavailable (no pinned version)"
            out[table] = info
            continue
        for commit in lake.history(table, limit=max(info["current_version"] - version + 2, 2)):
            if commit.get("version") == version:
                info["committed_at"] = _iso(commit.get("timestamp"))
                info["operation"] = commit.get("operation")
                writer = commit.get("run_id") or (commit.get("custom_metadata") or {}).get("run_id")
                if writer:  # lake writes stamp the Dagster run in the commit (lake.DeltaLake commit_properties)
                    info["written_by_run"] = str(writer)
        try:
            local = [f[len("file://"):] if f.startswith("file://") else f for f in lake.files(table, version)]
            gone = [f for f in local if "://" not in f and not Path(f).exists()]
            info["time_travel"] = "files vacuumed" if gone else "available"
        except Exception as exc:  # noqa: BLE001 - a vacuumed/cleaned log: say so, do not fail the report
            info["time_travel"] = f"unavailable ({type(exc).__name__})"
        out[table] = info
    return out


def collect_inputs(settings: Settings, version: str, instance: Any = None) -> dict[str, Any]:
    """Everything build_lineage needs for one model version, read from MLflow, Dagster and Delta."""
    import time

    from mlflow.exceptions import MlflowException

    from features.registry import registry_version
    from models.registry import mlflow_client

    client = mlflow_client(settings)
    try:
        mv = client.get_model_version(settings.model_name, str(version))
    except MlflowException as exc:
        raise LookupError(f"model {settings.model_name} has no version {version} in the registry at "
                          f"{settings.mlflow_tracking_uri}: list versions with `mlflow models` or the MLflow UI") from exc
    rm = client.get_registered_model(settings.model_name)
    aliases = [a for a, v in (rm.aliases or {}).items() if str(v) == str(mv.version)]
    run = client.get_run(mv.run_id) if mv.run_id else None
    artifacts: dict[str, Any] = {}
    if run is not None:
        import mlflow

        for name in ("evaluation.json", "gate.json"):
            try:
                artifacts[name] = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{name}")
            except Exception as exc:  # noqa: BLE001 - an older run without the artifact
                log.warning("no %s on run %s: %s", name, mv.run_id, exc)
    tags = dict(mv.tags or {})
    pins = delta_pins(tags)
    instance = instance or dagster_instance(settings)
    return {
        "model_version": {"name": mv.name, "version": mv.version, "run_id": mv.run_id, "tags": tags,
                          "creation_timestamp": mv.creation_timestamp, "aliases": aliases, "source": mv.source},
        "run": {} if run is None else {"run_id": run.info.run_id, "params": dict(run.data.params),
                                       "metrics": dict(run.data.metrics), "start_time": run.info.start_time,
                                       "end_time": run.info.end_time},
        "artifacts": artifacts,
        "dagster": collect_dagster(instance, tags.get("dagster.run_id"), sorted(pins)),
        "delta": collect_delta(settings, pins),
        "registered_model_tags": dict(rm.tags or {}),
        "feature_registry_now": registry_version(),
        "generated_at_ms": int(time.time() * 1000),
    }


def lineage_for_version(settings: Settings, version: str, instance: Any = None) -> dict[str, Any]:
    return build_lineage(**collect_inputs(settings, version, instance=instance))


def write_lineage(lineage: Mapping[str, Any], folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    json_path, html_path = folder / "lineage.json", folder / "lineage.html"
    json_path.write_text(json.dumps(lineage, indent=2, sort_keys=True, default=str))
    html_path.write_text(render_html(lineage))
    return json_path, html_path


def publish_lineage(settings: Settings, version: str, folder: Path, instance: Any = None) -> dict[str, Any]:
    """Build the lineage, write lineage.json/.html to `folder`, log both on the version's MLflow run under
    `lineage/`, and tag the version with where they are (`lineage.uri`)."""
    from models.registry import mlflow_client

    lineage = lineage_for_version(settings, version, instance=instance)
    json_path, html_path = write_lineage(lineage, folder)
    client = mlflow_client(settings)
    run_id = lineage["model"]["run_id"]
    client.log_artifact(run_id, str(json_path), artifact_path=LINEAGE_DIR)
    client.log_artifact(run_id, str(html_path), artifact_path=LINEAGE_DIR)
    uri = f"runs:/{run_id}/{LINEAGE_DIR}/lineage.html"
    client.set_model_version_tag(settings.model_name, str(version), LINEAGE_TAG, uri)
    return {"lineage": lineage, "json_path": json_path, "html_path": html_path, "uri": uri}


# ---------------------------------------------------------------------------------------------- requests
def find_request(settings: Settings, request_id: str, redis_client: Any = None) -> dict[str, Any] | None:
    """A served request from the impression_log Delta table, else from the Redis impression stream
    (answers not landed yet): its user, time, model version, served_by and items."""
    from lake.delta import DeltaLake

    lake = DeltaLake(settings.lake_uri)
    if lake.exists("impression_log"):
        rows = lake.read("impression_log", filters=[("request_id", "=", str(request_id))])
        if len(rows):
            rows = rows.sort_values("position")
            first = rows.iloc[0]
            return {"request_id": str(request_id), "source": "delta:impression_log",
                    "user_id": first.get("user_id"), "request_ts": int(first.get("request_ts") or 0),
                    "request_at": _iso(first.get("request_ts")), "model_version": first.get("model_version"),
                    "feature_version": first.get("feature_version"), "served_by": first.get("served_by"),
                    "items": rows["item_id"].astype(str).tolist()}
    if redis_client is None:
        return None
    from serving.impressions import IMPRESSION_STREAM

    last = "+"
    while True:  # newest first, 1,000 entries per round trip
        entries = redis_client.xrevrange(IMPRESSION_STREAM, max=last, min="-", count=1000)
        if not entries:
            return None
        for _entry_id, fields in entries:
            raw = fields.get("record") or fields.get(b"record")
            record = json.loads(raw)
            if str(record.get("request_id")) == str(request_id):
                return {"request_id": str(request_id), "source": f"redis:{IMPRESSION_STREAM}",
                        "user_id": record.get("user_id"), "request_ts": int(record.get("request_ts") or 0),
                        "request_at": _iso(record.get("request_ts")), "model_version": record.get("model_version"),
                        "feature_version": record.get("feature_version"), "served_by": record.get("served_by"),
                        "items": [it["item_id"] for it in record.get("items", [])]}
        entry_id = entries[-1][0]
        last = "(" + (entry_id.decode() if isinstance(entry_id, bytes) else entry_id)  # exclusive (Redis >= 6.2)


def request_lineage(settings: Settings, request_id: str, redis_client: Any = None, instance: Any = None) -> dict[str, Any]:
    """request -> model version -> data: the request as served and the lineage of the model that answered it."""
    request = find_request(settings, request_id, redis_client)
    if request is None:
        raise LookupError(f"request {request_id} is neither in the impression_log Delta table nor in the Redis "
                          "impression stream: check the id (the `request_id` field of the answer), or run the "
                          "`log_impressions` job if the stream was trimmed")
    version = request.get("model_version")
    if version in (None, "", "unregistered", "None"):
        raise LookupError(f"request {request_id} was answered by {request.get('served_by')} without a registered "
                          "model (popularity fallback): there is no model lineage to show")
    return {"request": request, "lineage": lineage_for_version(settings, str(version), instance=instance)}
