"""The MLflow registry: one model version = the whole bundle directory; aliases switch versions.

Every new version gets alias "challenger"; "champion" moves only when the gate passed (directly with
auto_promote, else through the staged rollout in training/rollout.py).
This module writes (runs, versions, tags); the read path serving uses (alias -> verified bundle) and the
one MLflow client builder live in models/registry.py, so serving never imports training code.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.pyfunc import PythonModel

from models.bundle import MANIFEST, Bundle, file_sha256
from models.registry import CHALLENGER, CHAMPION, MANIFEST_SHA_TAG, alias_model_version, mlflow_client
from ground.settings import Settings
from training.rollout import promote, record_promotion, start_rollout

log = logging.getLogger("kairos.registry")

EXPERIMENT = "kairos"
BUNDLE_ARTIFACT = "bundle"
PIP_REQUIREMENTS = ["mlflow", "torch", "lightgbm", "faiss-cpu", "numpy", "pandas"]
# MLflow 3 opens an experiment without a kind in GenAI mode (traces, prompts): this one trains models
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
EXPERIMENT_DESCRIPTION = ("Kairos ranking models: each run trains the two-tower retrieval model, its FAISS index and "
                          "the LightGBM ranker on pinned Delta table versions (run inputs), evaluates them against "
                          "popularity, co-occurrence and the champion on the test window, applies the gate and "
                          "registers the bundle as one model version.")
MODEL_DESCRIPTION = ("One version = user tower + item embeddings + FAISS index + LightGBM ranker + feature schema + "
                     "popularity lists, served together by the BentoML ranking endpoint (alias champion). Input: "
                     "user_id and optional history (JSON list of item ids); output: the top item ids.")


class BundleModel(PythonModel):  # imported by name: mypy reads mlflow.pyfunc as mlflow's LazyLoader attribute
    """pyfunc wrapper: rows with `user_id` (optional `history`, `num_results`) -> top item ids by the towers."""

    def load_context(self, context) -> None:
        # MLflow resolved this path from the registry itself; the file digests are still verified
        self.bundle = Bundle.load(Path(context.artifacts[BUNDLE_ARTIFACT]), allow_untrusted_path=True)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        n = int((params or {}).get("num_results", 10))
        out = []
        for _, row in frame.iterrows():
            hist = row.get("history") if "history" in frame else None
            hist = json.loads(hist) if isinstance(hist, str) else list(hist or [])
            uid = row.get("user_id")
            if uid not in self.bundle.user_row and not hist:
                out.append(self.bundle.popular(n))
                continue
            items, _ = self.bundle.retrieve(self.bundle.user_vector(uid, hist), n)
            out.append(items)
        return pd.DataFrame({"user_id": frame["user_id"].tolist(), "items": out})


def artifact_location(settings: Settings) -> str | None:
    """Where a new experiment keeps its artifacts: KAIROS_MLFLOW_ARTIFACTS if set; with a remote tracking
    server (http[s]://, databricks) None, so the server's own artifact root is used (artifacts must not land
    on the client's disk, where the server and other clients cannot read them); else KAIROS_HOME/mlartifacts."""
    if settings.mlflow_artifacts:
        return settings.mlflow_artifacts
    if settings.mlflow_tracking_uri.split(":", 1)[0] in ("http", "https", "databricks"):
        return None
    return settings.mlflow_artifact_root


def _experiment_id(client, settings: Settings) -> str:
    """The `kairos` experiment, created on first use, always marked as model training with its description."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        location = artifact_location(settings)
        if location and "://" not in location:
            Path(location).mkdir(parents=True, exist_ok=True)
        try:
            client.create_experiment(EXPERIMENT, artifact_location=location)
        except Exception:  # created concurrently  # noqa: BLE001
            pass
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            raise RuntimeError(f"MLflow experiment {EXPERIMENT!r} could not be created at {settings.mlflow_tracking_uri}")
    for key, value in {**EXPERIMENT_KIND, "mlflow.note.content": EXPERIMENT_DESCRIPTION}.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def training_run_name(params: dict, tags: dict[str, str]) -> str:
    """What trained on what, readable in the run list: models, training-set version, rows, Dagster run."""
    parts = ["two-tower+lightgbm"]
    if tags.get("delta.training_set.version") not in (None, ""):
        parts.append(f"training_set v{tags['delta.training_set.version']}")
    if params.get("training_rows") not in (None, ""):
        parts.append(f"{params['training_rows']} rows")
    if tags.get("dagster.run_id"):
        parts.append(f"dagster {str(tags['dagster.run_id'])[:8]}")
    return " · ".join(parts)


def model_signature() -> Any:
    """The pyfunc's contract: user_id (+ optional JSON history) in, the top item ids out; num_results a param."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "user_id"), ColSpec("string", "history", required=False)]),
                          outputs=Schema([ColSpec("string", "user_id"), ColSpec(Array("string"), "items")]),
                          params=ParamSchema([ParamSpec("num_results", "long", 10)]))


def input_example(bundle_dir: Path) -> pd.DataFrame:
    """A real request for this bundle: a known user with two popular items as session history."""
    bundle = Bundle.load(Path(bundle_dir), allow_untrusted_path=True)
    user = str(bundle.user_ids[0]) if len(bundle.user_ids) else "new-user"
    return pd.DataFrame({"user_id": [user], "history": [json.dumps(bundle.popular(2))]})


def log_delta_inputs(settings: Settings, tags: dict[str, str]) -> list[str]:
    """Each Delta table version the run read (`delta.<table>.version` tags) as an MLflow dataset input."""
    from mlflow.data.delta_dataset_source import DeltaDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    from lake.delta import DeltaLake

    lake = DeltaLake(settings.lake_uri)
    logged = []
    for key, value in sorted(tags.items()):
        if not (key.startswith("delta.") and key.endswith(".version") and str(value).lstrip("-").isdigit()):
            continue
        table = key[len("delta."):-len(".version")]
        source = DeltaDatasetSource(path=lake.uri(table), delta_table_version=int(value))
        # MetaDataset leaves Dataset.profile abstract in its annotations only (Dataset is no ABC): it instantiates
        mlflow.log_input(MetaDataset(source, name=f"{table}@v{value}"),  # type: ignore[abstract]
                         context="training" if table == "training_set" else "upstream")
        logged.append(f"{table}@v{value}")
    return logged


def flatten_metrics(metrics: dict[str, dict], prefix: str = "test") -> dict[str, float]:
    """{"two_stage": {"auc": .7}} -> {"test.two_stage.auc": .7}; non-numeric and NaN values skipped;
    the "champion" entry (the previous champion's numbers) is logged as "champion_at_eval.*"."""
    flat: dict[str, float] = {}
    for model, vals in (metrics or {}).items():
        if not isinstance(vals, dict):
            continue
        head = "champion_at_eval" if model == "champion" else f"{prefix}.{model}"
        for k, v in vals.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if math.isnan(float(v)) or math.isinf(float(v)):
                continue
            flat[f"{head}.{k}"] = float(v)
    return flat


def register_bundle(settings: Settings, bundle_dir: Path, metrics: dict[str, dict], params: dict,
                    tags: dict[str, str], gate: Any, extra_dicts: dict[str, Any] | None = None,
                    extra_files: list[Path] | None = None, auto_promote: bool = True) -> str:
    """One run + one registered model version holding the whole bundle directory. Returns the version.

    A version that passed the gate becomes `champion` directly when `auto_promote` (the old champion
    stays loadable as `previous_champion`); otherwise it enters the staged rollout (shadow -> canary ->
    promote, training/rollout.py). A failed gate only moves `challenger`.

    `extra_dicts` are logged as JSON artifacts (e.g. the full evaluation, feature importance) and
    `extra_files` as files (e.g. the evaluation HTML report), so a reviewer finds them on the run.
    """
    import mlflow

    client = mlflow_client(settings)
    exp_id = _experiment_id(client, settings)
    gate_dict = asdict(gate) if hasattr(gate, "__dataclass_fields__") else dict(gate)
    str_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    gate_tags = {"gate.passed": str(bool(gate_dict["passed"])),
                 "gate.reasons": " | ".join(gate_dict.get("reasons", []))[:4900]}
    run_name = training_run_name(params or {}, str_tags)
    description = (f"{run_name}. Gate {'passed' if gate_dict['passed'] else 'FAILED'}: "
                   f"{'; '.join(gate_dict.get('reasons', []))[:2000]}")
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name,
                          tags={**str_tags, "mlflow.note.content": description}) as run:
        log_delta_inputs(settings, str_tags)
        mlflow.log_params({str(k): str(v)[:6000] for k, v in (params or {}).items()})
        flat = flatten_metrics(metrics)
        if flat:
            mlflow.log_metrics(flat)
        mlflow.log_dict(gate_dict, "gate.json")
        mlflow.log_dict(json.loads(json.dumps(metrics, default=str)), "evaluation.json")
        for name, doc in (extra_dicts or {}).items():
            mlflow.log_dict(json.loads(json.dumps(doc, default=str)), name)
        for path in extra_files or []:
            if Path(path).exists():
                mlflow.log_artifact(str(path), artifact_path="reports")
        mlflow.set_tags(gate_tags)
        manifest_path = Path(bundle_dir) / MANIFEST
        if manifest_path.exists():
            mlflow.log_artifact(str(manifest_path), artifact_path="manifest")
        info = mlflow.pyfunc.log_model(
            name=BUNDLE_ARTIFACT,
            python_model=BundleModel(),
            artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=settings.model_name,
            signature=model_signature(),
            input_example=input_example(Path(bundle_dir)),
        )
        run_id = run.info.run_id
    version = str(info.registered_model_version)
    if version in ("None", ""):
        found = client.search_model_versions(f"name='{settings.model_name}' and run_id='{run_id}'")
        version = str(max(int(v.version) for v in found))
    client.update_registered_model(settings.model_name, description=MODEL_DESCRIPTION)
    client.update_model_version(settings.model_name, version, description=description)
    integrity = {MANIFEST_SHA_TAG: file_sha256(manifest_path)} if manifest_path.exists() else {}
    for k, v in {**str_tags, **gate_tags, **integrity, "run_id": run_id}.items():
        client.set_model_version_tag(settings.model_name, version, k, v)
    client.set_registered_model_alias(settings.model_name, CHALLENGER, version)
    by = f"dagster run {str_tags['dagster.run_id']}" if str_tags.get("dagster.run_id") else "training.registry.register_bundle"
    record_promotion(settings, version, CHALLENGER, by, "newly registered version")
    stage = "challenger only (gate failed)"
    if gate_dict["passed"]:
        if auto_promote:
            promote(settings, version, reason="gate passed (auto_promote)", by=by)
            stage = "promoted"
        else:
            stage = start_rollout(settings, version, reason="gate passed")
    log.info("registered %s version %s (%s)", settings.model_name, version, stage)
    return version


def champion_metrics(settings: Settings) -> dict | None:
    """The champion's "two_stage" test metrics (auc, ndcg_at_10, ...), or None without a champion."""
    mv = alias_model_version(settings, CHAMPION)
    if mv is None or not mv.run_id:
        return None
    run = mlflow_client(settings).get_run(mv.run_id)
    head = "test.two_stage."
    return {k[len(head):]: float(v) for k, v in run.data.metrics.items() if k.startswith(head)} or None
