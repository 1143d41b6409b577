"""Screenshots of the operator pages, taken with headless Chromium, so a person can look at what users see.

    .venv/bin/python tools/screenshots.py [--home .kairos] [--out .kairos/screenshots]

Starts a Dagster webserver over KAIROS_HOME's instance (the demo's runs), `mlflow ui` over its tracking store
and, if a champion exists, the BentoML ranking server; then saves one PNG per page: runs and jobs, the asset
catalog (owners, kinds), checks (contract and counts, the train/serve skew check), partitions, drift metadata
(report links), the registered model (lineage metadata), every published report (GX data docs, Evidently
drift, evaluation, lineage: the URLs the assets' metadata link to), the MLflow experiment, the newest model
version (signature) and its training run (datasets), and Swagger (typed answers). Needs `chromium`
(`apt-get install -y chromium`). Every process it starts is stopped at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assets.resources import mlflow_ui_link  # noqa: E402
from orchestration.cli import use_dagster_client_env  # noqa: E402
from orchestration.services import free_port  # noqa: E402

use_dagster_client_env()  # an entry point: before dagster is imported (the webserver it starts inherits it)

MODEL = os.environ.get("KAIROS_MODEL_NAME", "kairos-ranker")


def _wait(url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return str(shutil.which(name))
    raise SystemExit("no chromium found: apt-get install -y chromium")


def shoot(browser: str, url: str, path: Path, wait_ms: int = 20000) -> Path:
    """One page as PNG; the virtual time budget lets the single-page apps fetch and render their data. Each shot
    has a fresh browser profile (no localStorage, e.g. MLflow's remembered view): what a new visitor sees."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kairos-chromium-") as profile:
        subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", "--window-size=1600,1100", f"--virtual-time-budget={wait_ms}",
                        f"--screenshot={path}", url],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=240)
    return path


# the report links the assets publish (MetadataValue.url into the MLflow UI): asset -> metadata keys
REPORT_LINKS = {"silver_events": ("data_docs_url",), "feature_drift": ("report_url", "ranker_report_url"),
                "model_evaluation": ("report_url",), "registered_model": ("lineage_url",)}


def report_links(instance) -> dict[str, str]:
    """The newest published report URL of each asset in REPORT_LINKS (what one click opens in the UI); a report
    that fell back to a file path is left out, it has no page to show."""
    from dagster import AssetKey, UrlMetadataValue

    out: dict[str, str] = {}
    for asset, keys in REPORT_LINKS.items():
        event = instance.get_latest_materialization_event(AssetKey(asset))
        metadata = event.asset_materialization.metadata if event is not None else {}
        for key in keys:
            value = metadata.get(key)  # every MetadataValue has a `url` (the factory): only UrlMetadataValue links
            if isinstance(value, UrlMetadataValue) and value.url:
                out[f"report_{asset}_{key.removesuffix('_url')}"] = value.url
    return out


def pages(dagster: str, mlflow_ui: str, bento: str | None, experiment_id: str | None, model: str,
          version: str = "1", training_run_id: str | None = None,
          reports: dict[str, str] | None = None) -> dict[str, str]:
    out = {
        "dagster_runs": f"{dagster}/runs",
        "dagster_job_build_runs": f"{dagster}/locations/kairos/jobs/build/runs",
        "dagster_job_ingest_events_partitions": f"{dagster}/locations/kairos/jobs/ingest_events/partitions",
        "dagster_asset_catalog": f"{dagster}/assets",
        "dagster_silver_events_checks": f"{dagster}/assets/silver_events?view=checks",
        "dagster_impression_log_skew_check": f"{dagster}/assets/impression_log?view=checks",
        "dagster_registered_model_lineage": f"{dagster}/assets/registered_model",
        "dagster_feature_drift": f"{dagster}/assets/feature_drift",
        "dagster_model_evaluation": f"{dagster}/assets/model_evaluation",
        "mlflow_model_version": mlflow_ui_link(mlflow_ui, f"models/{model}/versions/{version}"),
    }
    if experiment_id:  # in the model-training view, as the published links open (assets.resources.mlflow_ui_link)
        out["mlflow_experiment"] = mlflow_ui_link(mlflow_ui, f"experiments/{experiment_id}")
        if training_run_id:
            out["mlflow_training_run"] = mlflow_ui_link(mlflow_ui, f"experiments/{experiment_id}/runs/{training_run_id}")
    out.update(reports or {})
    if bento:
        out["swagger"] = f"{bento}/docs"
    return out


def _report_port(reports: dict[str, str]) -> int | None:
    """The loopback port the published report links name (KAIROS_MLFLOW_UI_URL, `make mlflow-ui`: 5000), when it is
    free: the MLflow UI is started there, so the report pages are shot at the very URLs a user clicks."""
    import socket
    from urllib.parse import urlparse

    for url in reports.values():
        parsed = urlparse(url)
        if parsed.hostname in ("127.0.0.1", "localhost") and parsed.port:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", parsed.port))
                except OSError:
                    return None  # something already listens there (a user's own `make mlflow-ui`): leave it
            return parsed.port
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=os.environ.get("KAIROS_HOME", str(ROOT / ".kairos")))
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    home = Path(args.home).resolve()
    out = Path(args.out or home / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    browser = _chromium()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "KAIROS_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    tracking = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
    os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
    from dagster import DagsterInstance
    from dagster._core.nux import set_nux_seen

    set_nux_seen()  # the "Join the Dagster community" dialog a fresh profile gets once per instance: as if skipped

    with DagsterInstance.get() as instance:
        reports = report_links(instance)
    d_port, m_port = free_port(), _report_port(reports) or free_port()
    procs = [subprocess.Popen([str(bin_dir / "dagster-webserver"), "-w", str(ROOT / "workspace.yaml"), "-h", "127.0.0.1",
                               "-p", str(d_port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([str(bin_dir / "mlflow"), "ui", "--backend-store-uri", tracking, "--host", "127.0.0.1",
                               "--port", str(m_port), "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        dagster, mlflow_ui = f"http://127.0.0.1:{d_port}", f"http://127.0.0.1:{m_port}"
        print(f"[1/3] waiting for the Dagster webserver ({dagster}) and MLflow ({mlflow_ui})", flush=True)
        _wait(f"{dagster}/server_info", 600)
        _wait(mlflow_ui, 600)
        from mlflow.tracking import MlflowClient

        from training.registry import EXPERIMENT

        client = MlflowClient(tracking)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        versions = sorted(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
        newest = versions[-1] if versions else None
        bento = None
        if os.environ.get("KAIROS_SCREENSHOT_SWAGGER", "1") != "0":
            from serving.server import start_server, wait_ready

            b_port = free_port()
            procs.append(start_server(b_port, env={**env, "MLFLOW_TRACKING_URI": tracking}))
            bento = f"http://127.0.0.1:{b_port}"
            wait_ready(bento, timeout_s=300)
        targets = pages(dagster, mlflow_ui, bento, experiment.experiment_id if experiment else None, MODEL,
                        newest.version if newest else "1", newest.run_id if newest else None, reports)
        print(f"[2/3] {len(targets)} pages", flush=True)
        for k, (name, url) in enumerate(targets.items(), 1):
            path = shoot(browser, url, out / f"{name}.png")
            print(f"  [{k}/{len(targets)}] {name}: {url} -> {path}", flush=True)
        print(f"[3/3] screenshots in {out}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
