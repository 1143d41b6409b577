"""The heavy build steps' functions, run directly on a world `bench/world.py --keep` left behind: CPU per stage.

    .venv/bin/python bench/world.py --shapes 2y-200k --keep            # once: prints the home it keeps
    .venv/bin/python bench/stages.py --home /tmp/kairos-bench-world-2y-200k-XXXX
    .venv/bin/python bench/stages.py --home ... --stages ranker --profile /tmp/ranker.prof

Runs what the training_set, two_tower_model and ranker_model assets run (training/dataset.py, two_tower.py,
ranker.py) on that home's lake, without Dagster, and prints per stage: wall seconds, CPU seconds of this
process and CPU seconds of the whole process tree (the Spark JVM and its Python workers included, via psutil).
With --profile, the driver-side Python of each stage is profiled (cProfile, written as <path>.<stage>).
The training_set stage writes a new version of the home's training_set table (the later stages read it).

The Dagster steps (model_evaluation, registered_model, feature_drift, feature_health) are re-materialized one at a
time through Dagster on the kept home's instance (their upstream outputs loaded by the IO manager, their run config
from the home's build run), with the embedded Redis started on the home; per step it prints the same CPU figures
and a sha256 of what the step produced that does not depend on timing (model_evaluation: its metrics without the
latency/report entries; the others: their metadata without paths, urls and versions), so two checkouts can be
compared for identical outputs on the same home.
Run A/B by pointing PYTHONPATH at two checkouts on the same home.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
MODEL_STAGES = ("training_set", "two_tower", "ranker")
DAGSTER_STAGES = ("model_evaluation", "registered_model", "feature_drift", "feature_health")
STAGES = MODEL_STAGES + DAGSTER_STAGES
# entries of a step's output / metadata that differ between two runs of the same code (clocks, paths, ids, versions)
VOLATILE = ("latency", "report", "url", "path", "html", "version", "run_id", "freshness", "staleness", "age_s",
            "lineage", "tags")


def _tree_cpu() -> float:
    """CPU seconds of this process and its live descendants, plus what their reaped children used."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def timed(name: str, fn: Callable[[], Any], profile: str) -> tuple[Any, dict[str, float]]:
    prof = cProfile.Profile() if profile else None
    w0, c0, t0 = time.perf_counter(), time.process_time(), _tree_cpu()
    if prof:
        prof.enable()
    out = fn()
    if prof:
        prof.disable()
        prof.dump_stats(f"{profile}.{name}")
    figures = {"wall_s": round(time.perf_counter() - w0, 1), "driver_cpu_s": round(time.process_time() - c0, 1),
               "tree_cpu_s": round(_tree_cpu() - t0, 1)}
    print(f"{name:<28}" + "  ".join(f"{k} {v:>7.1f}" for k, v in figures.items()), flush=True)
    return out, figures


def training_set(lake: Any, spark: Any, profile: str) -> dict[str, float]:
    """What the training_set asset runs (its split config from the world's build run), up to the Delta write."""
    from assets.features import ITEM_FEATURES, TRAINING_SET, USER_FEATURES
    from assets.ingestion import ITEMS, LABELS, SILVER
    from training.dataset import SplitConfig, build_training_set

    store = lake.lake()
    pins = {t: store.pin(t) for t in (LABELS, SILVER, USER_FEATURES, ITEM_FEATURES, ITEMS)}
    cfg = _build_config("training_set")
    split = SplitConfig(cfg.get("validation_days", 2.0), cfg.get("test_days", 2.0), cfg.get("gap_hours", 0.0),
                        test_quantile=cfg.get("test_quantile"))
    print(f"  split {split}", flush=True)

    def run() -> Any:
        read = {t: spark.read_table(store, t, p.version) for t, p in pins.items()}
        items = store.read(ITEMS, version=pins[ITEMS].version)
        built, _ = build_training_set(spark.session(), read[LABELS], read[SILVER], read[USER_FEATURES],
                                      read[ITEM_FEATURES], items, split)
        return spark.write_table(store, TRAINING_SET, built)

    return timed("training_set", run, profile)[1]


def _build_config(op: str) -> dict[str, Any]:
    """An op's config in the home's latest Dagster run that configured it ({} if none)."""
    from dagster import DagsterInstance

    for run in DagsterInstance.get().get_runs():  # newest first
        cfg = (run.run_config or {}).get("ops", {}).get(op, {}).get("config")
        if cfg is not None:
            return dict(cfg)
    return {}


def models(store: Any, stages: list[str], profile: str, ranker_max_rows: int | None) -> dict[str, dict[str, float]]:
    from assets.features import TRAINING_SET
    from assets.ingestion import ITEMS, USERS
    from training.dataset import read_training_set
    from training.ranker import RankerConfig, fit_ranker
    from training.two_tower import TwoTowerConfig, train_two_tower

    out: dict[str, dict[str, float]] = {}
    (frame, items, users), out["read_training_set"] = timed("read_training_set", lambda: (
        read_training_set(store, TRAINING_SET, store.pin(TRAINING_SET).version),
        store.read(ITEMS, version=store.pin(ITEMS).version), store.read(USERS, version=store.pin(USERS).version)),
        profile)
    print(f"  training set: {len(frame):,} rows, {frame['split'].value_counts().to_dict()}", flush=True)
    train, valid = frame[frame["split"] == "train"], frame[frame["split"] == "validation"]
    tt, out["two_tower"] = timed("two_tower", lambda: train_two_tower(train, items, users, TwoTowerConfig(),
                                                                      valid_rows=valid), profile)
    if "ranker" in stages:
        ranker_config = RankerConfig() if ranker_max_rows is None else RankerConfig(max_train_rows=ranker_max_rows)
        (booster, _, chosen), out["ranker.fit"] = timed("ranker.fit", lambda: fit_ranker(
            frame, tt, items, users, ranker_config), profile)  # the affinity in sample and out of fold, both rankers
        print(f"  ranker best iteration {booster.best_iteration}, affinity choice {chosen}", flush=True)
    return out


def _stable(value: Any) -> Any:
    """`value` without the entries named in VOLATILE (recursively), floats rounded to 9 significant digits."""
    from dagster import MetadataValue

    if isinstance(value, MetadataValue):  # a record (a tuple): its value, not its fields
        value = value.value
    if isinstance(value, dict):
        return {str(k): _stable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
                if not any(w in str(k) for w in VOLATILE)}
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.9g}")
    return value if isinstance(value, (str, int, bool, type(None))) else str(value)


def dagster_step(step: str, profile: str) -> dict[str, Any]:
    """Re-materialize one asset of the build graph on the home's instance; CPU figures and the sha of its output."""
    import hashlib

    from dagster import DagsterInstance, materialize

    from orchestration.definitions import defs

    instance = DagsterInstance.get()
    cfg = _build_config(step)
    run_config = {"ops": {step: {"config": cfg}}} if cfg else {}
    assets = list(defs.assets or [])
    result, figures = timed(step, lambda: materialize(assets, selection=[step], instance=instance,
                                                      resources=defs.resources, run_config=run_config), profile)
    if not result.success:
        raise SystemExit(f"{step} failed")
    mats = result.asset_materializations_for_node(step)
    stable: dict[str, Any] = {"metadata": _stable({k: v for m in mats for k, v in m.metadata.items()})}
    if step == "model_evaluation":
        stable["output"] = _stable(result.output_for_node(step))
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()
    print(f"  {step} output sha256 {digest[:16]}", flush=True)
    if os.environ.get("KAIROS_STAGES_DUMP"):  # a directory: the stable output as JSON, to diff two checkouts
        Path(os.environ["KAIROS_STAGES_DUMP"], f"{step}.json").write_text(json.dumps(stable, sort_keys=True,
                                                                                   indent=1, default=str))
    return {**figures, "sha256": digest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", required=True, help="a KAIROS_HOME kept by bench/world.py --keep")
    parser.add_argument("--stages", nargs="+", default=list(MODEL_STAGES), choices=STAGES)
    parser.add_argument("--profile", default="", help="write cProfile stats to <path>.<stage>")
    parser.add_argument("--ranker-max-rows", type=int, default=None, help="RankerConfig.max_train_rows (default: its own)")
    args = parser.parse_args()
    os.environ["KAIROS_HOME"] = args.home
    for key in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "KAIROS_LAKE_URI", "REDIS_URL"):
        os.environ.pop(key, None)
    os.environ["DAGSTER_HOME"] = str(Path(args.home) / "dagster")
    from assets.resources import LakeResource, SparkResource

    lake = LakeResource()
    figures: dict[str, Any] = {}
    if "training_set" in args.stages:
        figures["training_set"] = training_set(lake, SparkResource(), args.profile)
    if {"two_tower", "ranker"} & set(args.stages):
        figures.update(models(lake.lake(), args.stages, args.profile, args.ranker_max_rows))
    steps = [s for s in DAGSTER_STAGES if s in args.stages]
    if steps:
        from ground.settings import Settings
        from orchestration.cli import ensure_redis, use_dagster_client_env

        use_dagster_client_env()
        redis = ensure_redis(Settings.from_env())
        try:
            for step in steps:
                figures[step] = dagster_step(step, args.profile)
        finally:
            if redis is not None:
                redis.stop()
    print("RESULT " + json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
