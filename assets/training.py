"""Training assets: two-tower → FAISS index → LightGBM ranker → evaluation → gate → MLflow registry.

Large objects pass between these assets through Dagster's IO manager (pickled
under KAIROS_HOME); the registered bundle is the unit that serves (invariant 4).
"""

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from dagster import (AssetCheckResult, AssetCheckSpec, AssetExecutionContext, Config, DataVersion, MetadataValue,
                     Output, asset)

from assets.features import ITEM_FEATURES, TRAINING_SET, USER_FEATURES
from assets.ingestion import BRONZE, ITEMS, LABELS, SILVER, USERS
from features.registry import registry_version
from assets.config import dataclass_config, to_dataclass
from assets.resources import ArtifactsResource, LakeResource, MlflowResource
from compliance.versions import source_version
from training.dataset import read_training_set
from training.gates import GateConfig
from training.ranker import RankerConfig
from training.two_tower_config import TWO_TOWER_COLUMNS, TwoTowerConfig
from ground.settings import PROJECT_ROOT

GROUP = "training"
INDEX_MIN_RECALL = 0.95


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# what registered_model reads of the training set: the bundle's popularity lists and item similarity
# (training/trainer.py: split, label, user, item, device) and the row count; the row order's columns
BUNDLE_COLUMNS = ["event_id", "timestamp", "split", "user_id", "item_id", "label_binary", "device_type"]


def _load_training_inputs(lake: LakeResource, columns: list[str] | None = None
                          ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    store = lake.lake()
    pins = {t: store.pin(t) for t in (TRAINING_SET, ITEMS, USERS)}
    frame = read_training_set(store, TRAINING_SET, pins[TRAINING_SET].version, columns=columns)
    items = store.read(ITEMS, version=pins[ITEMS].version)
    users = store.read(USERS, version=pins[USERS].version)
    return frame, items, users, pins


# the launchpad's two-tower knobs, types and defaults from TwoTowerConfig. The training budget (0 = no cap): a seeded
# sample of at most max_examples_per_epoch positives per epoch, and of max_validation_examples validation positives
# for early stopping; recorded in the asset metadata and the registered version's params (two_tower.max_examples_...)
if TYPE_CHECKING:  # a class built at import: mypy reads these run configs as Any
    TwoTowerTrainConfig = Any
else:
    TwoTowerTrainConfig = dataclass_config("TwoTowerTrainConfig", TwoTowerConfig, (
        "dim", "epochs", "temperature", "seed", "max_examples_per_epoch", "max_validation_examples"), __name__)


@asset(deps=[TRAINING_SET, ITEMS, USERS], group_name=GROUP,
       code_version=source_version(__file__, "training/two_tower.py", "models/two_tower.py"),
       description="Two-tower retrieval model (PyTorch, in-batch softmax) and the item embeddings it produces.")
def two_tower_model(context: AssetExecutionContext, config: TwoTowerTrainConfig,
                    lake: LakeResource) -> Output:
    from training.two_tower import train_two_tower

    frame, items, users, pins = _load_training_inputs(lake, TWO_TOWER_COLUMNS)
    tt_config = to_dataclass(config, TwoTowerConfig)
    result = train_two_tower(frame[frame["split"] == "train"], items, users, tt_config,
                             valid_rows=frame[frame["split"] == "validation"])
    metrics = {k: v for k, v in getattr(result, "metrics", {}).items() if isinstance(v, (int, float))}
    return Output(result, metadata={"items": len(result.item_ids), "users": len(result.user_ids),
                                    "dim": int(result.item_embeddings.shape[1]),
                                    "training_set_version": pins[TRAINING_SET].version, **metrics})


@asset(group_name=GROUP, check_specs=[AssetCheckSpec("index_recall", asset="faiss_index", blocking=True,
                                                        description="FAISS recall@100 against exact search >= 0.95. Blocking: "
                                                                    "a lossy index is never ranked over or registered.")],
       code_version=source_version(__file__, "training/index.py"),
       description="HNSW inner-product index over the item embeddings; refused below recall@100 0.95 vs exact search.")
def faiss_index(context: AssetExecutionContext, two_tower_model: Any):
    import faiss
    import numpy as np

    from training.index import build_faiss_index, index_recall_at_k

    emb = two_tower_model.item_embeddings
    index = build_faiss_index(emb, kind="hnsw")
    rng = np.random.default_rng(0)
    queries = emb[rng.choice(len(emb), size=min(200, len(emb)), replace=False)]
    recall = float(index_recall_at_k(index, emb, queries, k=min(100, len(emb))))
    yield Output(faiss.serialize_index(index).tobytes(), metadata={"ntotal": int(index.ntotal), "recall_at_100": recall})
    yield AssetCheckResult(check_name="index_recall", passed=recall >= INDEX_MIN_RECALL,
                           metadata={"recall_at_100": recall, "threshold": INDEX_MIN_RECALL})


# RankerConfig's knobs (objective: or "lambdarank" / "rank_xendcg": scores are then not probabilities, no logloss/ECE),
# max_train_rows (0 = no cap: above it, a seeded sample of whole queries; recorded in the asset metadata),
# affinity_folds (the train split's embedding affinity out of fold, training/ranker.py ranker_training_affinity),
# plus use_tuned_params: take the knobs found by the `ranker_tuning` asset (job tune_ranker)
if TYPE_CHECKING:
    RankerTrainConfig = Any
else:
    RankerTrainConfig = dataclass_config("RankerTrainConfig", RankerConfig, (
        "num_boost_round", "learning_rate", "num_leaves", "seed", "objective", "max_train_rows", "affinity_folds"), __name__,
        use_tuned_params=(bool, False))


@asset(deps=[TRAINING_SET, ITEMS, USERS], group_name=GROUP, code_version=source_version(__file__, "training/ranker.py"),
       description="LightGBM ranker over the registry's features plus the two-tower affinity.")
def ranker_model(context: AssetExecutionContext, config: RankerTrainConfig,
                 two_tower_model: Any, lake: LakeResource, artifacts: ArtifactsResource) -> Output:
    from training.ranker import fit_ranker

    frame, items, users, pins = _load_training_inputs(lake)
    ranker_config = to_dataclass(config, RankerConfig)
    if config.use_tuned_params:
        from training.tuning import load_tuned

        ranker_config = load_tuned(artifacts.path("tuning"), ranker_config)
        context.log.info(f"ranker uses tuned parameters: {ranker_config}")
    booster, _, chosen = fit_ranker(frame, two_tower_model, items, users, ranker_config)
    gains = dict(zip(booster.feature_name(), booster.feature_importance("gain").round(2).tolist()))
    return Output(booster, metadata={"best_iteration": int(booster.best_iteration or booster.current_iteration()),
                                     "max_train_rows": ranker_config.max_train_rows,
                                     "affinity_folds": ranker_config.affinity_folds,
                                     "affinity_choice": MetadataValue.json(chosen),
                                     "feature_importance_gain": MetadataValue.json(gains)})


class TuningConfig(Config):
    trials: int = 12
    seed: int = 7


@asset(deps=[TRAINING_SET, ITEMS, USERS], group_name="tuning", code_version=source_version(__file__, "training/tuning.py"),
       description="Optional: seeded random search over the ranker's LightGBM knobs, scored by validation NDCG@10; "
                   "ranker_model takes the best with use_tuned_params: true.")
def ranker_tuning(context: AssetExecutionContext, config: TuningConfig, two_tower_model: Any, lake: LakeResource,
                  artifacts: ArtifactsResource) -> Output:
    from training.ranker import ranker_training_affinity
    from training.tuning import save_tuned, tune_ranker

    frame, items, users, pins = _load_training_inputs(lake)
    frame = ranker_training_affinity(frame, two_tower_model, items, users)  # the rows ranker_model learns from
    result = tune_ranker(frame[frame["split"] == "train"], frame[frame["split"] == "validation"],
                         trials=config.trials, seed=config.seed)
    path = save_tuned({**result, "training_set_version": pins[TRAINING_SET].version}, artifacts.path("tuning"))
    context.log.info(f"tuning: best {result['metric']} {result['best'][result['metric']]:.4f} "
                     f"(default {result['default'][result['metric']]:.4f}); saved to {path}")
    return Output(result["best"], metadata={"best": MetadataValue.json(result["best"]),
                                            "lift_over_default": float(result["lift_over_default"]),
                                            "trials": MetadataValue.md(pd.DataFrame(result["trials"]).to_markdown(index=False)),
                                            "path": MetadataValue.path(str(path)),
                                            "training_set_version": pins[TRAINING_SET].version})


class CatalogEvalConfig(Config):
    k: int = 10
    ablations: bool = False  # also score the served pipeline without exploration / MMR (their cost on the metric)
    sessions: bool = True  # the next-item session protocol beside session-kNN
    max_session_cases: int = 300  # seeded sample of held-out session prefixes (bench/quality.py asks for 2000)
    # seeded sample of the test window's users the served pipeline is replayed for (0: all of them); every system
    # and baseline is scored on the same users; keep it >= the gate's min_test_users
    max_eval_users: int = 1000


def _catalog_evaluation(context: AssetExecutionContext, config: CatalogEvalConfig, lake: LakeResource, frame: pd.DataFrame,
                        items: pd.DataFrame, users: pd.DataFrame, two_tower_model: Any, faiss_index: bytes,
                        ranker_model: Any, champion: Any | None) -> dict:
    """The served top-K over the whole catalog at the test window's start, beside the baselines (training/served_eval.py)."""
    import time

    from models.bundle import POPULARITY_PRIOR, SIMILARITY_PRIOR
    from serving.rerank import RerankConfig
    from training.served_eval import evaluate_catalog, fit_popularity_prior, similarity_prior
    from training.trainer import SIMILARITY_SERVE_SPLITS, assemble_bundle, item_similarity

    store = lake.lake()
    rerank = RerankConfig.from_env()  # evaluated with the re-ranking the server is configured with
    test = frame[frame["split"] == "test"]
    split_ms = int(test["timestamp"].min())
    candidate = assemble_bundle(two_tower_model, faiss_index, ranker_model, frame, users)
    candidate.model_version = "candidate"
    lake_frames = (store.read(LABELS), store.read(SILVER, columns=["user_id", "item_id", "event_type", "timestamp", "session_id"]),
                   store.read(USER_FEATURES), store.read(ITEM_FEATURES), items, users)
    t = time.perf_counter()
    valid = frame[frame["split"] == "validation"]
    prior = {"feature": None, "weight": 0.0, "reason": "no validation window"}
    if len(valid):
        prior = fit_popularity_prior(candidate, *lake_frames, int(valid["timestamp"].min()), split_ms, k=config.k,
                                     rerank=rerank)
    candidate.manifest[POPULARITY_PRIOR] = {k: prior.get(k, 0.0) for k in ("feature", "weight", "session_weight")}
    candidate.manifest[SIMILARITY_PRIOR] = similarity_prior(prior)
    candidate.similarity = item_similarity(frame, SIMILARITY_SERVE_SPLITS)  # weight fitted: counts up to the test window
    context.log.info(f"popularity prior fitted on the validation window ({prior.get('validation_users', 0)} users, "
                     f"{prior.get('session_cases', 0)} session prefixes) in {time.perf_counter() - t:.1f}s: weight "
                     f"{prior['weight']} ({prior.get('ndcg_by_weight') or prior.get('reason')}), in sessions "
                     f"{prior.get('session_weight', 0.0)} ({prior.get('p20_by_session_weight') or prior.get('session_reason')}); "
                     f"item similarity {prior.get('similarity')}")
    t = time.perf_counter()
    result = evaluate_catalog({"served": candidate, "champion": champion}, *lake_frames, split_ms,
                              k=config.k, ablations=config.ablations, sessions=config.sessions,
                              max_session_cases=config.max_session_cases, rerank=rerank,
                              max_users=config.max_eval_users or None)
    result[POPULARITY_PRIOR] = prior
    context.log.info(f"catalog evaluation at {split_ms} over {result['split']['users']} test users "
                     f"(seeded sample of {result['split']['users_in_window']}; "
                     f"{result['split']['warm_users']} warm) in {time.perf_counter() - t:.1f}s: "
                     + ", ".join(f"{name} {m[f'ndcg_at_{config.k}']:.4f}" for name, m in result["systems"].items()))
    return result


@asset(deps=[TRAINING_SET, ITEMS, USERS, LABELS, SILVER, USER_FEATURES, ITEM_FEATURES], group_name=GROUP,
       code_version=source_version(__file__, "training/evaluation.py", "training/gates.py", "training/catalog_eval.py",
                                   "training/baselines.py", "training/served_eval.py", "serving/offline.py",
                                   "serving/pipeline.py", "models/item_similarity.py"),
       description="Test-window metrics of the two-stage model beside popularity, logistic regression and two-tower alone.")
def model_evaluation(context: AssetExecutionContext, config: CatalogEvalConfig, two_tower_model: Any, ranker_model: Any,
                     faiss_index: bytes, lake: LakeResource, mlflow: MlflowResource, artifacts: ArtifactsResource) -> Output:
    from training.evaluation import evaluate_models
    from training.registry import champion_metrics

    from features.functions import assemble_features
    from training.gates import feature_health, scoring_latency
    from training.ranker import add_embedding_affinity

    from models.registry import CHAMPION, load_alias
    from training.evaluation import evaluate_bundle, evaluation_plot_png, evaluation_report_html

    frame, items, users, _ = _load_training_inputs(lake)
    metrics = evaluate_models(frame, two_tower_model, ranker_model)
    # the champion re-scored on this very test window (comparable AUC); its logged metrics as a fallback
    champion, source = {}, "none: no champion yet"
    bundle = None
    try:
        bundle = load_alias(mlflow.settings(), CHAMPION)
        if bundle is not None:
            champion, source = evaluate_bundle(frame, bundle), f"version {bundle.model_version} re-scored on this test window"
    except Exception as exc:  # noqa: BLE001 - an unreadable champion must not block evaluating the candidate
        context.log.warning(f"champion could not be re-scored ({type(exc).__name__}: {exc}); using its logged metrics")
        champion, source = champion_metrics(mlflow.settings()) or {}, "logged metrics of its own run (older window)"
    metrics["champion"] = champion
    metrics["champion_source"] = source
    metrics["catalog"] = _catalog_evaluation(context, config, lake, frame, items, users, two_tower_model, faiss_index,
                                             ranker_model, bundle)
    test = frame[frame["split"] == "test"]
    x_test = assemble_features(add_embedding_affinity(test, two_tower_model))
    metrics["scoring_latency"] = scoring_latency(lambda x: ranker_model.predict(x, num_threads=1), x_test.to_numpy())
    metrics["feature_health"] = feature_health(x_test)
    flat = {f"{m}.{k}": round(float(v), 5) for m, vals in metrics.items() if isinstance(vals, dict)
            for k, v in vals.items() if isinstance(v, (int, float))}
    context.log.info("evaluation: " + json.dumps(flat))
    report = evaluation_report_html(metrics, artifacts.path("reports", context.run_id) / "evaluation.html")
    metrics["report_html"] = str(report)
    metrics["report_plot"] = str(evaluation_plot_png(metrics, artifacts.path("reports", context.run_id) / "evaluation.png"))
    return Output(metrics, metadata={"table": MetadataValue.json(metrics), "report": MetadataValue.path(str(report)),
                                     "report_url": artifacts.publish_report(report, context.run_id),
                                     "champion_source": source, **flat})


# every GateConfig threshold (training/gates.py says what each means), plus auto_promote. True: a passing version
# becomes champion at once (the demo). False: it enters the staged rollout (shadow -> canary -> promote,
# assets/rollout.py) and the champion moves only when the canary passes.
if TYPE_CHECKING:
    GateSettings = Any
else:
    GateSettings = dataclass_config("GateSettings", GateConfig, tuple(f.name for f in dataclasses.fields(GateConfig)),
                                    __name__, auto_promote=(bool, True))


@asset(group_name=GROUP, check_specs=[AssetCheckSpec("gate_passed", asset="validation_gate",
                                                        description="The validation gate (NDCG lift over popularity, AUC vs champion, "
                                                                    "latency, nulls). Not blocking on purpose: a failed candidate is still "
                                                                    "registered as challenger only, never champion.")],
       code_version=source_version(__file__, "training/gates.py"),
       description="Pass/fail with reasons: beat popularity on NDCG@10, keep the champion's AUC, score 200 candidates "
                   "within the p99 budget, no null or uncovered features.")
def validation_gate(context: AssetExecutionContext, config: GateSettings,
                    model_evaluation: dict):
    from training.gates import evaluate_gate

    gate = evaluate_gate(model_evaluation["two_stage"], model_evaluation["popularity"],
                         model_evaluation.get("champion") or None,
                         to_dataclass(config, GateConfig),
                         latency=model_evaluation.get("scoring_latency"), health=model_evaluation.get("feature_health"),
                         catalog=model_evaluation.get("catalog"))
    for reason in gate.reasons:
        context.log.info(f"gate: {reason}")
    gate.checks["rollout"] = {"auto_promote": bool(config.auto_promote)}  # read by registered_model
    yield Output(gate, metadata={"passed": gate.passed, "reasons": MetadataValue.json(gate.reasons),
                                 "checks": MetadataValue.json(gate.checks)})
    yield AssetCheckResult(check_name="gate_passed", passed=bool(gate.passed),
                           metadata={"reasons": MetadataValue.json(gate.reasons)})


@asset(deps=[BRONZE, SILVER, LABELS, USER_FEATURES, ITEM_FEATURES, TRAINING_SET, ITEMS, USERS], group_name=GROUP,
       code_version=source_version(__file__, "training/trainer.py", "models/bundle.py", "models/two_tower.py",
                                   "models/item_similarity.py",
                                   "training/registry.py", "models/registry.py", "compliance/lineage.py"),
       check_specs=[AssetCheckSpec("lineage_complete", asset="registered_model",
                                   description="Every Delta version the model read is credited to the Dagster run that wrote it.")],
       description="One MLflow model version = towers + embeddings + FAISS index + ranker + feature schema, with lineage tags; "
                   "alias 'champion' moves only when the gate passed.")
def registered_model(context: AssetExecutionContext, two_tower_model: Any, faiss_index: bytes, ranker_model: Any,
                     model_evaluation: dict, validation_gate: Any, lake: LakeResource, mlflow: MlflowResource,
                     artifacts: ArtifactsResource):
    from models.bundle import POPULARITY_PRIOR, SIMILARITY_PRIOR
    from training.registry import register_bundle
    from training.served_eval import similarity_prior
    from training.trainer import SIMILARITY_SERVE_SPLITS, assemble_bundle

    frame, items, users, pins = _load_training_inputs(lake, BUNDLE_COLUMNS)
    store = lake.lake()
    for t in (BRONZE, SILVER, LABELS, USER_FEATURES, ITEM_FEATURES):
        pins[t] = store.pin(t)
    tags: dict[str, str] = {}
    for p in pins.values():
        tags.update(p.as_tag())
    tags.update({"dagster.run_id": context.run_id, "git.sha": git_sha(), "feature_registry.version": registry_version(),
                 "gate.passed": str(bool(validation_gate.passed))})
    prior = (model_evaluation.get("catalog") or {}).get(POPULARITY_PRIOR) or {}
    bundle = assemble_bundle(two_tower_model, faiss_index, ranker_model, frame, users,
                             manifest={"data_versions": {p.table: p.version for p in pins.values()},
                                       "dagster_run_id": context.run_id,
                                       # the weight model_evaluation fitted on validation and evaluated with
                                       POPULARITY_PRIOR: {"feature": prior.get("feature"), "weight": float(prior.get("weight", 0.0)),
                                                          "session_weight": float(prior.get("session_weight", 0.0))},
                                       SIMILARITY_PRIOR: similarity_prior(prior)},
                             similarity_splits=SIMILARITY_SERVE_SPLITS)  # what model_evaluation evaluated
    bundle_dir = bundle.save(artifacts.path("bundles", context.run_id))
    params = {"training_rows": len(frame), "git_sha": tags["git.sha"],
              **{f"two_tower.{k}": v for k, v in (getattr(two_tower_model, "config", None) or {}).items()},
              **{f"ranker.{k}": v for k, v in (ranker_model.params or {}).items()},
              "ranker.best_iteration": int(ranker_model.best_iteration or ranker_model.current_iteration())}
    importance = dict(zip(ranker_model.feature_name(), ranker_model.feature_importance("gain").round(3).tolist()))
    report = model_evaluation.get("report_html")
    version = register_bundle(mlflow.settings(), bundle_dir, model_evaluation, params, tags, validation_gate,
                              extra_dicts={"feature_importance_gain.json": importance},
                              extra_files=[Path(f) for f in (report, model_evaluation.get("report_plot")) if f],
                              auto_promote=bool(validation_gate.checks.get("rollout", {}).get("auto_promote", True)))
    context.log.info(f"registered model version {version} (champion: {validation_gate.passed})")
    from compliance.lineage import lineage_gaps, publish_lineage

    # lineage.json/.html on the MLflow run (tag lineage.uri on the version) and here on the asset
    lineage = publish_lineage(mlflow.settings(), str(version), artifacts.path("lineage", context.run_id),
                              instance=context.instance)
    yield Output(str(version), metadata={"model_version": str(version), "champion": bool(validation_gate.passed),
                                          "tags": MetadataValue.json(tags),
                                          "lineage_html": MetadataValue.path(str(lineage["html_path"])),
                                          "lineage_url": artifacts.publish_report(Path(lineage["html_path"]),
                                                                                  context.run_id, "lineage"),
                                          "lineage_uri": lineage["uri"],
                                          "lineage": MetadataValue.json({k: lineage["lineage"][k] for k in
                                                                         ("model", "code", "gate", "promotions")}),
                                          "data_read": MetadataValue.json(lineage["lineage"]["data"]["tables"])},
                  data_version=DataVersion(f"{mlflow.settings().model_name}/v{version}"))
    gaps = lineage_gaps(lineage["lineage"])
    yield AssetCheckResult(check_name="lineage_complete", passed=not gaps, metadata={"gaps": MetadataValue.json(gaps)},
                           description="Every Delta version read traces to the Dagster run that wrote it, the silver "
                                       "contract results are found, and code/registry versions and the gate are recorded.")
