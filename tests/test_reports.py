"""Report links: published to MLflow and opened over HTTP from a real `mlflow ui`, not a file path."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from assets.resources import ArtifactsResource
from orchestration.services import free_port


def _sidebar(browser: str, url: str, profile: Path) -> set[str]:
    """Which of MLflow 3.17's view-specific sidebar entries the rendered page shows, in a fresh browser profile:
    "Model registry" (model-training view) or "Playground" (GenAI view)."""
    dom = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                          "--virtual-time-budget=20000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=240).stdout
    assert "workflow" in dom or "mlflow" in dom.lower(), dom[:500]
    return {entry for entry in ("Model registry", "Playground") if entry in dom}


def test_report_link_opens_over_http(settings, tmp_path: Path) -> None:
    report = tmp_path / "drift.html"
    report.write_text("<html><body><h1>feature drift: ok</h1></body></html>", encoding="utf-8")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.html").write_text("<html>GX data docs</html>", encoding="utf-8")
    port = free_port()
    artifacts = ArtifactsResource(mlflow_ui_url=f"http://127.0.0.1:{port}")
    link = artifacts.publish_report(report, "run-abc12345")
    again = artifacts.publish_report(docs, "run-abc12345", "data_docs")  # same Dagster run: same MLflow run
    assert type(link).__name__ == "UrlMetadataValue" and link.url.startswith(f"http://127.0.0.1:{port}/#/experiments/")
    run_id = link.url.split("/runs/")[1].split("/")[0]
    assert link.url.endswith(f"/runs/{run_id}/artifacts/reports/drift.html?workflowType=machine_learning")
    assert again.url.endswith(f"/runs/{run_id}/artifacts/data_docs/docs/index.html?workflowType=machine_learning")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri",
                             settings.mlflow_tracking_uri, "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        base = f"http://{urlparse(link.url).netloc}"
        deadline, page = time.time() + 900, None  # mlflow ui starts in minutes on a busy machine
        while time.time() < deadline:
            try:
                page = httpx.get(f"{base}/get-artifact", params={"path": "reports/drift.html", "run_uuid": run_id},
                                 timeout=10)
                break
            except httpx.HTTPError:
                time.sleep(1)
        assert page is not None and page.status_code == 200, page and page.text[:300]
        assert "feature drift: ok" in page.text
        assert httpx.get(base + "/", timeout=10).status_code == 200  # the UI page the link opens
        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if browser:  # a fresh browser opens the link in MLflow's model-training view; without the parameter, GenAI
            assert _sidebar(browser, link.url, tmp_path / "p1") == {"Model registry"}
            assert _sidebar(browser, link.url.split("?")[0], tmp_path / "p2") == {"Playground"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_unreachable_tracking_store_falls_back_to_the_path(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    report = tmp_path / "r.html"
    report.write_text("x")
    value = ArtifactsResource().publish_report(report, "run-1")
    assert type(value).__name__ == "PathMetadataValue" and value.path == str(report)


def test_screenshot_script_shoots_every_published_report(tmp_path: Path) -> None:
    """tools/screenshots.py takes the report URLs from the assets' newest materializations (a real instance), so
    each report page the UI links to is looked at; a report that fell back to a path has no page."""
    import importlib.util

    from dagster import AssetMaterialization, DagsterInstance, MetadataValue

    spec = importlib.util.spec_from_file_location("screenshots", Path(__file__).resolve().parents[1] / "tools" / "screenshots.py")
    screenshots = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshots)
    ui = "http://127.0.0.1:5000/#/experiments/3/runs/abc/artifacts"
    with DagsterInstance.ephemeral() as instance:
        for asset, metadata in (("silver_events", {"data_docs_url": MetadataValue.url(f"{ui}/data_docs/docs/index.html")}),
                                ("feature_drift", {"report_url": MetadataValue.url(f"{ui}/reports/drift.html"),
                                                   "ranker_report_url": MetadataValue.path("/tmp/ranker.html")}),
                                ("registered_model", {"lineage_url": MetadataValue.url(f"{ui}/reports/lineage.html")})):
            instance.report_runless_asset_event(AssetMaterialization(asset, metadata=metadata))
        links = screenshots.report_links(instance)
    assert links == {"report_silver_events_data_docs": f"{ui}/data_docs/docs/index.html",
                     "report_feature_drift_report": f"{ui}/reports/drift.html",
                     "report_registered_model_lineage": f"{ui}/reports/lineage.html"}
    targets = screenshots.pages("http://d", "http://m", "http://b", "7", "kairos-ranker", "4", "run9", links)
    view = "?workflowType=machine_learning"  # MLflow 3.17 opens GenAI without it (assets.resources.mlflow_ui_link)
    assert targets["mlflow_model_version"] == f"http://m/#/models/kairos-ranker/versions/4{view}"
    assert targets["mlflow_training_run"] == f"http://m/#/experiments/7/runs/run9{view}"
    assert targets["mlflow_experiment"] == f"http://m/#/experiments/7{view}"
    assert targets["swagger"] == "http://b/docs" and set(links) <= set(targets)
    assert targets["dagster_impression_log_skew_check"] == "http://d/assets/impression_log?view=checks"
