"""Lineage: every asset declares its code version and every table it reads; the per-model lineage report
(MLflow + Dagster + Delta) is built, rendered, logged and reachable from a served request id."""
from __future__ import annotations

import inspect
import re
import types

import pytest
from dagster import AssetKey

from orchestration.definitions import defs

# assets that read nothing the graph produces: their inputs are external (a source, Redis, the lake as a whole)
ROOTS = {"catalog_items", "catalog_users", "bronze_events", "lake_maintenance"}


def _asset_keys() -> set[str]:
    return {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}


def _tables_read(assets_def, known: set[str]) -> set[str]:
    """Asset names an asset's code reads: constants bound to asset names, and string literals passed to lake
    reads, in its compute function and the module-level helpers it calls (one level)."""
    fn = assets_def.op.compute_fn.decorated_fn
    module = inspect.getmodule(fn)
    sources = [inspect.getsource(fn)]
    for name in re.findall(r"\b(_?[a-z][a-z0-9_]*)\(", sources[0]):
        helper = getattr(module, name, None)
        if isinstance(helper, types.FunctionType) and helper.__module__ == module.__name__ and helper is not fn:
            sources.append(inspect.getsource(helper))
    found: set[str] = set()
    for src in sources:
        body = src.split(":\n", 1)[-1] if src.lstrip().startswith("def ") else src
        for const in re.findall(r"\b([A-Z][A-Z0-9_]+)\b", body):
            value = getattr(module, const, None)
            if isinstance(value, str) and value in known:
                found.add(value)
        # string literals only where the lake is read (a literal may also be a dict key that happens to match)
        literals = re.findall(r"""\.(?:read|pin|read_arrow|exists|version|files)\(\s*["']([a-z_]+)["']""", body)
        literals += re.findall(r"""read_table\([^,()]+,\s*["']([a-z_]+)["']""", body)
        found.update(s for s in literals if s in known)
    return found


def test_every_asset_has_a_code_version_and_declares_what_it_reads() -> None:
    graph = defs.resolve_asset_graph()
    known = _asset_keys()
    missing_code, missing_deps = [], {}
    for assets_def in graph.assets_defs:
        if not assets_def.is_materializable:
            continue
        own = {k.to_user_string() for k in assets_def.keys}
        upstream = {p.to_user_string() for k in assets_def.keys for p in graph.get(k).parent_keys}
        for key in assets_def.keys:
            if not graph.get(key).code_version:
                missing_code.append(key.to_user_string())
        reads = _tables_read(assets_def, known) - own
        undeclared = reads - upstream
        if undeclared:
            missing_deps[sorted(own)[0]] = sorted(undeclared)
        for key in own - ROOTS:
            assert graph.get(AssetKey(key)).parent_keys, f"{key} declares no upstream assets"
    assert not missing_code, f"assets without code_version: {missing_code}"
    assert not missing_deps, f"assets reading tables they do not declare as deps: {missing_deps}"


def test_code_versions_follow_the_source(tmp_path) -> None:
    from compliance.versions import source_version

    a = tmp_path / "a.py"
    a.write_text("x = 1\n")
    v1 = source_version(a)
    assert v1 == source_version(a) and len(v1) == 12
    b = tmp_path / "b.py"
    b.write_text("x = 2\n")
    assert source_version(b) != v1
    graph = defs.resolve_asset_graph()
    # labels and training_set run different library code: different versions
    assert graph.get(AssetKey("labels")).code_version != graph.get(AssetKey("training_set")).code_version
    with pytest.raises(FileNotFoundError, match="code_version"):
        source_version("no/such/module.py")


# ---------------------------------------------------------------------------------------------- the document
def _inputs() -> dict:
    """Hand-made inputs in the shape collect_inputs returns (two ingest runs, one build run)."""
    mats = [
        {"asset": "silver_events", "run_id": "ingest-1", "timestamp": 10.0, "partition": "2026-01-01",
         "data_version": "silver_events@v3", "code_version": "aaa", "delta_version": 3, "rows": 90},
        {"asset": "silver_events", "run_id": "ingest-2", "timestamp": 20.0, "partition": "2026-01-02",
         "data_version": "silver_events@v5", "code_version": "aaa", "delta_version": 5, "rows": 120},
        {"asset": "training_set", "run_id": "build-1", "timestamp": 30.0, "partition": None,
         "data_version": "training_set@v2", "code_version": "bbb", "delta_version": 2, "rows": 400},
        {"asset": "registered_model", "run_id": "build-1", "timestamp": 40.0, "partition": None,
         "data_version": "x", "code_version": "ccc", "delta_version": None, "rows": None},
    ]
    checks = [
        {"asset": "silver_events", "check": "events_contract", "passed": True, "severity": "WARN", "run_id": "ingest-1",
         "metadata": {}},
        {"asset": "silver_events", "check": "events_contract", "passed": False, "severity": "WARN",
         "run_id": "ingest-2", "metadata": {"quarantine_rate": 0.2}},
        {"asset": "training_set", "check": "point_in_time_correct", "passed": True, "severity": "ERROR",
         "run_id": "build-1", "metadata": {}},
    ]
    tags = {"delta.silver_events.version": "4", "delta.silver_events.rows": "100",
            "delta.training_set.version": "2", "delta.training_set.rows": "400", "dagster.run_id": "build-1",
            "git.sha": "abc123", "feature_registry.version": "reg1", "gate.passed": "True",
            "promoted.challenger.at": "1767225600000", "promoted.challenger.by": "dagster run build-1",
            "promoted.challenger.reason": "newly registered version",
            "promoted.champion.at": "1767229200000", "promoted.champion.by": "<script>alert(1)</script>",
            "promoted.champion.reason": "gate passed"}
    return {"model_version": {"name": "kairos-ranker", "version": "7", "run_id": "r7", "tags": tags,
                              "creation_timestamp": 1767225600000, "aliases": ["champion"]},
            "run": {"run_id": "r7", "params": {"training_rows": "400"}, "metrics": {"test.two_stage.auc": 0.71}},
            "artifacts": {"gate.json": {"passed": True, "reasons": ["PASS beats_popularity: 0.3 > 0.2"], "checks": {}},
                          "evaluation.json": {"two_stage": {"auc": 0.71}, "popularity": {"auc": 0.6}, "rows": 5}},
            "dagster": {"run": {"run_id": "build-1", "job": "build"}, "materializations": mats, "checks": checks},
            "delta": {"silver_events": {"current_version": 9, "committed_at": "2026-01-01T00:00:00+00:00",
                                        "operation": "WRITE", "time_travel": "available"}},
            "feature_registry_now": "reg2", "generated_at_ms": 1767230000000}


def test_build_lineage_joins_registry_dagster_and_delta() -> None:
    from compliance.lineage import build_lineage

    lin = build_lineage(**_inputs())
    assert lin == build_lineage(**_inputs())  # pure
    tables = lin["data"]["tables"]
    # silver v4 was read: ingest-1 wrote v3 and ingest-2 wrote v5, so v4 comes from the newest at or below it
    assert tables["silver_events"]["produced_by_run"] == "ingest-1" and tables["silver_events"]["rows"] == 100
    assert tables["silver_events"]["operation"] == "WRITE" and tables["silver_events"]["current_version"] == 9
    assert tables["training_set"] == {**tables["training_set"], "version": 2, "produced_by_run": "build-1",
                                      "data_version": "training_set@v2", "code_version": "bbb"}
    # the contract results are those of the run that produced the data read, not a later failing one
    assert [(c["check"], c["run_id"], c["passed"]) for c in lin["contracts"]] == [("events_contract", "ingest-1", True)]
    assert lin["dagster"]["data_runs"] == ["build-1", "ingest-1"]
    assert lin["code"]["asset_code_versions"] == {"registered_model": "ccc", "silver_events": "aaa", "training_set": "bbb"}
    assert lin["code"]["feature_registry_changed_since"] is True and lin["code"]["git_sha"] == "abc123"
    assert [p["alias"] for p in lin["promotions"]] == ["challenger", "champion"]
    assert lin["promotions"][1]["at"] == "2026-01-01T01:00:00+00:00"
    assert lin["gate"] == {"passed": True, "reasons": ["PASS beats_popularity: 0.3 > 0.2"], "checks": {}}
    assert set(lin["evaluation"]) == {"two_stage", "popularity"}
    # the completeness check names what cannot be accounted for
    from compliance.lineage import lineage_gaps

    assert lineage_gaps(lin) == ["no counts_reconcile result for the silver_events version read"]
    orphan = _inputs()
    orphan["dagster"]["materializations"] = [m for m in orphan["dagster"]["materializations"]
                                             if m["asset"] != "training_set"]
    assert "training_set v2: no Dagster materialization in the instance wrote it" in \
        lineage_gaps(build_lineage(**orphan))


def test_render_html_is_self_contained_and_escaped() -> None:
    from compliance.lineage import build_lineage, render_html

    page = render_html(build_lineage(**_inputs()))
    assert page.startswith("<!doctype html>") and "<script" not in page and "&lt;script&gt;" in page
    assert "http://" not in page and "https://" not in page and "<link" not in page  # nothing fetched
    for text in ("kairos-ranker version 7", "silver_events", "ingest-1", "events_contract", "abc123", "Gate: PASSED"):
        assert text in page, text


# ---------------------------------------------------------------------------------------------- on a real world
@pytest.fixture(scope="module")
def world():
    from tests._compliance_world import compliance_world, world_env

    w = compliance_world()
    with world_env(w):
        yield w


@pytest.mark.e2e
def test_lineage_logged_at_registration(world) -> None:
    import json as _json

    import mlflow
    from dagster import DagsterInstance

    from models.registry import mlflow_client

    settings, version = world["settings"], world["version"]
    mv = mlflow_client(settings).get_model_version(settings.model_name, version)
    assert mv.tags["lineage.uri"] == f"runs:/{mv.run_id}/lineage/lineage.html"
    run = mlflow_client(settings).get_run(mv.run_id)
    doc = _json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/lineage/lineage.json"))
    assert doc["model"]["version"] == version and doc["dagster"]["training_run"]["run_id"] == world["run"]["run_id"]
    assert "<!doctype html>" in mlflow.artifacts.load_text(f"{run.info.artifact_uri}/lineage/lineage.html")
    event = DagsterInstance.get().get_latest_materialization_event(AssetKey("registered_model"))
    meta = event.asset_materialization.metadata
    assert meta["lineage_uri"].value == mv.tags["lineage.uri"]
    from pathlib import Path

    assert Path(meta["lineage_html"].value).exists()
    assert event.asset_materialization.tags["dagster/code_version"] == \
        defs.resolve_asset_graph().get(AssetKey("registered_model")).code_version
    assert event.asset_materialization.tags["dagster/data_version"] == f"{settings.model_name}/v{version}"
    from dagster import DagsterEventType

    checks = [e.dagster_event.event_specific_data for e in
              DagsterInstance.get().all_logs(world["run"]["run_id"], of_type=DagsterEventType.ASSET_CHECK_EVALUATION)]
    complete = [c for c in checks if c.check_name == "lineage_complete"]
    assert len(complete) == 1 and complete[0].passed, complete
    # Delta-backed assets report the table version they wrote as their data version
    silver = DagsterInstance.get().get_latest_materialization_event(AssetKey("silver_events")).asset_materialization
    assert silver.tags["dagster/data_version"] == f"silver_events@v{silver.metadata['delta_version'].value}"


@pytest.mark.e2e
def test_lineage_of_a_version_from_the_cli(world, capsys) -> None:
    import json as _json

    from orchestration.cli import main

    version, run = world["version"], world["run"]
    assert main(["lineage", "--version", version, "--json"]) == 0
    lin = _json.loads(capsys.readouterr().out)
    tables = lin["data"]["tables"]
    assert {"bronze_events", "silver_events", "labels", "training_set", "user_features", "catalog_items"} <= set(tables)
    assert tables["silver_events"]["produced_by_run"] == run["ingest_run_id"]
    assert tables["training_set"]["produced_by_run"] == run["run_id"]
    assert tables["training_set"]["data_version"] == f"training_set@v{tables['training_set']['version']}"
    checks = {(c["asset"], c["check"]) for c in lin["contracts"]}
    assert {("silver_events", "events_contract"), ("silver_events", "counts_reconcile")} <= checks
    assert all(c["run_id"] == run["ingest_run_id"] for c in lin["contracts"])
    graph = defs.resolve_asset_graph()
    for asset in ("two_tower_model", "ranker_model", "training_set", "labels"):
        assert lin["code"]["asset_code_versions"][asset] == graph.get(AssetKey(asset)).code_version, asset
    assert len(lin["code"]["git_sha"]) == 40 and lin["gate"]["reasons"]
    assert lin["training"]["params"]["training_rows"] == str(tables["training_set"]["rows"])
    by = {p["alias"]: p for p in lin["promotions"]}
    assert by["challenger"]["by"] == f"dagster run {run['run_id']}" and by["challenger"]["at"]
    assert main(["lineage", "--version", version]) == 0
    text = capsys.readouterr().out
    assert f"version {version}" in text and "events_contract" in text


@pytest.mark.e2e
def test_lineage_of_a_served_request(world, capsys, tmp_path) -> None:
    import json as _json

    from orchestration.cli import main

    version, other = world["version"], world["other"]
    # landed in the Delta impression log by the log_impressions job
    assert main(["lineage", "--request-id", "req-landed-other", "--json", "--html", str(tmp_path / "l.html")]) == 0
    doc = _json.loads(capsys.readouterr().out)
    assert doc["request"]["source"] == "delta:impression_log" and doc["request"]["user_id"] == other
    assert doc["request"]["model_version"] == version and doc["lineage"]["model"]["version"] == version
    assert len(doc["request"]["items"]) == 5 and (tmp_path / "l.html").read_text().startswith("<!doctype html>")
    # still only in the Redis impression stream
    assert main(["lineage", "--request-id", "req-in-redis-only", "--json"]) == 0
    doc = _json.loads(capsys.readouterr().out)
    assert doc["request"]["source"] == "redis:kairos:impressions" and doc["lineage"]["model"]["version"] == version
    with pytest.raises(SystemExit, match="neither in the impression_log"):
        main(["lineage", "--request-id", "no-such-request"])


def test_a_later_no_op_replay_is_not_credited_with_the_version(settings) -> None:
    """ingest-1 writes bronze v0; ingest-2 replays the unchanged day (no new version, same delta_version in its
    metadata) and then fails: the lineage credits ingest-1, from the Delta commit and from the event order."""
    import pandas as pd

    from compliance.lineage import build_lineage, collect_delta
    from lake.delta import DeltaLake

    lake = DeltaLake(settings.lake_uri)
    day = pd.DataFrame({"event_id": ["e1", "e2"], "ingest_date": ["2026-01-02"] * 2})
    first = lake.write_batch("bronze_events", day, batch_id="2026-01-02", replace_where="ingest_date = '2026-01-02'",
                             commit_properties={"run_id": "ingest-1"})
    replay = lake.write_batch("bronze_events", day, batch_id="2026-01-02", replace_where="ingest_date = '2026-01-02'",
                              commit_properties={"run_id": "ingest-2"})
    assert replay.skipped and replay.version == first.version
    inputs = _inputs()
    inputs["model_version"]["tags"].update({"delta.bronze_events.version": str(first.version),
                                            "delta.bronze_events.rows": "2"})
    inputs["dagster"]["materializations"] += [
        {"asset": "bronze_events", "run_id": run, "timestamp": ts, "partition": "2026-01-02", "delta_version": v,
         "data_version": f"bronze_events@v{v}", "code_version": "c", "rows": 2}
        for run, ts, v in (("ingest-1", 1.0, first.version), ("ingest-2", 50.0, replay.version))]
    delta = collect_delta(settings, {"bronze_events": {"version": first.version}})
    assert delta["bronze_events"]["written_by_run"] == "ingest-1"  # the Delta commit names its writer
    inputs["delta"] = {**inputs["delta"], **delta}
    assert build_lineage(**inputs)["data"]["tables"]["bronze_events"]["produced_by_run"] == "ingest-1"
    # without the commit's run id (an older table): the first run that reported the version, not the latest
    inputs["delta"]["bronze_events"] = {k: v for k, v in delta["bronze_events"].items() if k != "written_by_run"}
    assert build_lineage(**inputs)["data"]["tables"]["bronze_events"]["produced_by_run"] == "ingest-1"


def test_real_ingest_then_a_no_op_replay_credits_the_first_run(tmp_path, redis_server) -> None:
    """Two real `ingest_events` runs of one day on a real instance and lake: the replay writes no new bronze or
    silver version, reports the same ones later, and the lineage still names the run that wrote them."""
    from dagster import DagsterInstance

    from compliance.lineage import build_lineage, collect_dagster, collect_delta
    from lake.delta import DeltaLake
    from orchestration.definitions import defs
    from tests._env import fresh_home

    source = {"n_users": 40, "n_items": 50, "n_categories": 4, "days": 2, "seed": 5}
    with fresh_home(tmp_path / "kairos", redis_server.url) as settings:
        instance = DagsterInstance.get()
        job = defs.resolve_job_def("ingest_events")
        runs = [job.execute_in_process(instance=instance, partition_key="2026-01-02", raise_on_error=True,
                                       run_config={"ops": {"bronze_events": {"config": source}}}) for _ in range(2)]
        first, replay = (r.run_id for r in runs)
        lake = DeltaLake(settings.lake_uri)
        pins = {t: {"version": lake.version(t), "rows": len(lake.read(t))} for t in ("bronze_events", "silver_events")}
        dagster = collect_dagster(instance, None, list(pins))
        reported = {(m["asset"], m["run_id"]): m["delta_version"] for m in dagster["materializations"]}
        for table, pin in pins.items():  # both runs report the version; only the first wrote it
            assert reported[(table, first)] == reported[(table, replay)] == pin["version"], (table, reported)
        inputs = _inputs()
        inputs["model_version"]["tags"] = {**{f"delta.{t}.version": str(p["version"]) for t, p in pins.items()},
                                           **{f"delta.{t}.rows": str(p["rows"]) for t, p in pins.items()},
                                           "dagster.run_id": "build-1"}
        inputs["dagster"] = dagster
        inputs["delta"] = collect_delta(settings, pins)
        tables = build_lineage(**inputs)["data"]["tables"]
        assert {t: tables[t]["produced_by_run"] for t in pins} == {t: first for t in pins}
        for table in pins:  # an older table without the commit's run id: the event order still says the first
            inputs["delta"][table].pop("written_by_run", None)
        tables = build_lineage(**inputs)["data"]["tables"]
        assert {t: tables[t]["produced_by_run"] for t in pins} == {t: first for t in pins}
