"""The MLflow registry: one version per bundle, aliases move only through the gate."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from features.functions import assemble_features
from models.registry import alias_version, load_alias
from tests._trainset import make_training_set
from training.gates import GateResult
from training.ranker import add_embedding_affinity
from training.registry import champion_metrics, register_bundle
from training.trainer import TrainingOutcome, train_bundle
from training.two_tower_config import TwoTowerConfig


@pytest.fixture(scope="module")
def trained(small_world) -> tuple[TrainingOutcome, pd.DataFrame]:
    frame = make_training_set(small_world)
    out = train_bundle(frame, small_world.items, small_world.users, tt_config=TwoTowerConfig(epochs=4))
    return out, frame


def _tags(version: int) -> dict[str, str]:
    return {"delta.training_set.version": str(version), "delta.silver_events.version": str(version + 10),
            "git.sha": "abc123", "dagster.run_id": f"run-{version}"}


def test_registry_aliases_follow_the_gate(trained, settings, tmp_path) -> None:
    out, frame = trained
    bundle_dir = out.bundle.save(tmp_path / "bundle")
    failed = GateResult(False, ["FAIL beats_popularity: candidate NDCG@10 0.1000 vs popularity 0.2000."],
                        {"beats_popularity": {"passed": False}})
    metrics = {**out.metrics, "champion": {}}

    # nothing registered yet
    assert load_alias(settings) is None and alias_version(settings, "champion") is None
    assert champion_metrics(settings) is None

    v1 = register_bundle(settings, bundle_dir, metrics, out.params, _tags(1), failed)
    assert alias_version(settings, "challenger") == v1
    assert alias_version(settings, "champion") is None and load_alias(settings) is None
    assert champion_metrics(settings) is None

    passed = GateResult(True, ["PASS beats_popularity: ...", "PASS no_auc_regression: no champion yet"],
                        {"beats_popularity": {"passed": True}})
    v2 = register_bundle(settings, bundle_dir, metrics, out.params, _tags(2), passed)
    assert v2 != v1
    assert alias_version(settings, "champion") == v2 == alias_version(settings, "challenger")

    bundle = load_alias(settings, "champion")
    assert bundle is not None and bundle.model_version == v2
    test = add_embedding_affinity(frame[frame["split"] == "test"], out.two_tower)
    feats = assemble_features(test)
    assert np.array_equal(bundle.rank(feats), out.bundle.rank(feats))
    assert bundle.item_ids == out.bundle.item_ids
    assert bundle.manifest["feature_registry_version"] == out.bundle.manifest["feature_registry_version"]
    # cached per version: a second load does not download again and gives the same bundle
    again = load_alias(settings, "champion")
    assert np.array_equal(again.item_embeddings, bundle.item_embeddings)
    assert (settings.home / "model_cache").exists()

    champ = champion_metrics(settings)
    assert champ is not None and champ["auc"] == pytest.approx(out.metrics["two_stage"]["auc"])
    assert champ["ndcg_at_10"] == pytest.approx(out.metrics["two_stage"]["ndcg_at_10"])

    # a later failing candidate becomes the challenger; the champion stays put
    v3 = register_bundle(settings, bundle_dir, metrics, out.params, _tags(3), failed)
    assert alias_version(settings, "champion") == v2 and alias_version(settings, "challenger") == v3
    assert load_alias(settings, "challenger").model_version == v3

    from models.registry import mlflow_client

    client = mlflow_client(settings)
    mv = client.get_model_version(settings.model_name, v2)
    assert mv.tags["delta.training_set.version"] == "2" and mv.tags["delta.silver_events.version"] == "12"
    assert mv.tags["gate.passed"] == "True" and "no champion yet" in mv.tags["gate.reasons"]
    assert client.get_model_version(settings.model_name, v3).tags["gate.passed"] == "False"
    run = client.get_run(mv.run_id)
    assert run.data.tags["git.sha"] == "abc123"
    assert run.info.experiment_id == client.get_experiment_by_name("kairos").experiment_id
    assert client.get_experiment_by_name("kairos").artifact_location.endswith("mlartifacts")
    assert "test.two_stage.ndcg_at_10" in run.data.metrics and not any(k.startswith("test.champion") for k in run.data.metrics)
    assert run.data.params["training_rows"] == str(len(frame))
    artifacts = {a.path for a in client.list_artifacts(mv.run_id)}
    assert "gate.json" in artifacts


def test_pyfunc_predicts_top_items(trained, settings, tmp_path) -> None:
    import mlflow

    out, _ = trained
    bundle_dir = out.bundle.save(tmp_path / "bundle")
    ok = GateResult(True, ["PASS"], {})
    version = register_bundle(settings, bundle_dir, out.metrics, {"training_rows": 1}, _tags(1), ok)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{settings.model_name}/{version}")
    users = out.bundle.user_ids[:2] + ["never-seen"]
    pred = model.predict(pd.DataFrame({"user_id": users}))
    assert len(pred) == 3 and all(len(items) == 10 for items in pred["items"])
    assert pred["items"].iloc[2] == out.bundle.popular(10)


def test_version_has_signature_example_descriptions_and_delta_inputs(trained, settings, tmp_path) -> None:
    """What the MLflow UI shows: Schema inputs/outputs, a real input example, a model-training experiment,
    a run named after what trained, descriptions, and the Delta versions read as dataset inputs."""
    import mlflow
    from models.registry import mlflow_client

    out, _ = trained
    bundle_dir = out.bundle.save(tmp_path / "bundle")
    version = register_bundle(settings, bundle_dir, out.metrics, {"training_rows": 1234}, _tags(5),
                              GateResult(True, ["PASS beats_popularity"], {}))
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    client = mlflow_client(settings)
    info = mlflow.models.get_model_info(f"models:/{settings.model_name}/{version}")
    assert info.signature.inputs.input_names() == ["user_id", "history"]
    assert info.signature.outputs.input_names() == ["user_id", "items"]
    assert info.signature.params.params[0].name == "num_results"
    assert info.saved_input_example_info is not None
    example = mlflow.models.Model.load(info.model_uri).load_input_example(info.model_uri.replace("runs:", "runs:"))
    example = example[0] if isinstance(example, tuple) else example
    assert example["user_id"].iloc[0] in out.bundle.user_ids  # a real user, not "string"
    mv = client.get_model_version(settings.model_name, version)
    run = client.get_run(mv.run_id)
    assert run.info.run_name == "two-tower+lightgbm · training_set v5 · 1234 rows · dagster run-5"
    assert "Gate passed" in run.data.tags["mlflow.note.content"] and "Gate passed" in mv.description
    assert "FAISS" in client.get_registered_model(settings.model_name).description
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"].startswith("Kairos ranking models")
    inputs = {d.dataset.name: d.tags[0].value if d.tags else None for d in run.inputs.dataset_inputs}
    assert inputs == {"training_set@v5": "training", "silver_events@v15": "upstream"}
