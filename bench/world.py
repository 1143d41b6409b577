"""Bring-your-own-log benchmark: the whole asset graph through Dagster on three log shapes.

    .venv/bin/python bench/world.py                       # all three shapes
    .venv/bin/python bench/world.py --shapes ml-100k 20y-100k

Shapes (logs generated seeded by ingestion/synthetic_logs.py, except MovieLens-100K itself):
  20y-100k   100k ratings over 20 years, MovieLens "latest" format (ratings.csv + movies.csv)
  2y-1m      1M session clicks over 2 years, `;`-separated, 60% anonymous ("NA") sessions, date + ms
             offset timestamps, with a products.csv catalog (click-only label rule)
  ml-100k    MovieLens-100K from ../shared/data/movielens-100k
  2y-200k    2y-1m's generator at 200k clicks: the profiling shape (a fifth of the events, same span and kinds)

Each shape runs in its own process (fresh KAIROS_HOME, embedded Redis, local Spark): the world is
resolved from the data (partitions, split, label rule), then `materialize_all` runs the ingest and
build jobs. Printed per shape: events, seconds and seconds per million events per Dagster step, the
whole graph, the CPU seconds and the peak RSS of the process tree (Python driver + Spark JVM + workers,
sampled every 0.5 s). CPU seconds are the robust figure on a shared machine: wall time grows with load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `python bench/world.py` puts bench/ first on sys.path, where bench/streaming.py would shadow the streaming
# package (the feature_health asset imports streaming.job): the project root goes first instead
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
SHAPES = ("20y-100k", "2y-1m", "ml-100k")
PROFILE_SHAPES = ("2y-200k",)  # not run by default
TARGET_S = {"20y-100k": 180, "2y-1m": 600, "ml-100k": 180, "2y-200k": 120}


def _spec(shape: str, data: Path) -> dict:
    from ingestion.synthetic_logs import (PRODUCTS_MAPPING, SESSION_CLICKS_MAPPING, write_ratings_latest,
                                          write_session_clicks)

    if shape == "20y-100k":
        return {"source": "movielens-latest", "path": str(write_ratings_latest(data / "latest", 100_000, 20.0))}
    if shape in ("2y-1m", "2y-200k"):
        clicks, products = write_session_clicks(data / "sessions", 1_000_000 if shape == "2y-1m" else 200_000, 2.0)
        return {"source": "file", "path": str(clicks), "mapping": SESSION_CLICKS_MAPPING,
                "catalog": {"path": str(products), "mapping": PRODUCTS_MAPPING}}
    if shape == "ml-100k":
        from ground.settings import Settings

        return {"source": "movielens-100k", "path": str(Settings.from_env().movielens_100k_dir)}
    raise SystemExit(f"unknown shape {shape!r}; use {list(SHAPES + PROFILE_SHAPES)}")


def _step_seconds(run_id: str) -> dict[str, float]:
    """Seconds per step of a Dagster run, from its event log (STEP_START -> STEP_SUCCESS/FAILURE)."""
    from dagster import DagsterEventType, DagsterInstance

    starts: dict[str, float] = {}
    out: dict[str, float] = {}
    for record in DagsterInstance.get().all_logs(run_id):
        event = record.dagster_event
        if event is None or not event.step_key:
            continue
        if event.event_type == DagsterEventType.STEP_START:
            starts[event.step_key] = record.timestamp
        elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
            out[event.step_key] = round(record.timestamp - starts.get(event.step_key, record.timestamp), 2)
    return out


def child(shape: str, home: Path) -> None:
    """One shape in this process: generate, resolve the world, run both jobs, print one JSON line."""
    os.environ["KAIROS_HOME"] = str(home)
    for key in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "KAIROS_LAKE_URI", "REDIS_URL", "KAIROS_PARTITION_START",
                "KAIROS_PARTITION_END"):
        os.environ.pop(key, None)
    t0 = time.perf_counter()
    spec = _spec(shape, home / "data")
    t_gen = time.perf_counter() - t0
    from orchestration.world import resolve_world

    t1 = time.perf_counter()
    world = resolve_world(spec)
    t_world = time.perf_counter() - t1
    os.environ["KAIROS_PARTITION_START"] = world.partition_start
    os.environ["KAIROS_PARTITION_END"] = world.partition_end or "live"  # the log's days, as `kairos demo` draws them
    print(world.describe(), flush=True)
    from orchestration.cli import ensure_redis, materialize_all, prepare_home
    from ground.settings import Settings

    settings = Settings.from_env()
    prepare_home(settings)
    redis = ensure_redis(settings)
    try:
        run = materialize_all(Settings.from_env(), world.source, world.ops)
    finally:
        if redis is not None:
            redis.stop()
    steps = {**_step_seconds(run["ingest_run_id"]), **_step_seconds(run["run_id"])}
    print("RESULT " + json.dumps({"shape": shape, "events": world.summary["events"], "generate_s": round(t_gen, 1),
                                  "resolve_world_s": round(t_world, 1), "graph_s": round(run["seconds"], 1),
                                  "ingest_s": round(run["ingest_seconds"], 1), "success": run["success"],
                                  "steps": steps, "summary": world.summary}), flush=True)


def _tree_sample(pid: int, cpu: dict[int, float]) -> int:
    """RSS of the process tree now; records each process's CPU seconds so far into `cpu` (by pid)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            with p.oneshot():
                total += p.memory_info().rss
                t = p.cpu_times()
                cpu[p.pid] = max(cpu.get(p.pid, 0.0), t.user + t.system)
        except psutil.NoSuchProcess:
            pass
    return total


def run_shape(shape: str, keep: bool) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"kairos-bench-world-{shape}-"))
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}
    log = home / "bench.log"
    print(f"[{shape}] running in {home} (log {log})", flush=True)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--child", shape, "--home", str(home)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT))
        peak = [0]
        cpu: dict[int, float] = {}
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                peak[0] = max(peak[0], _tree_sample(proc.pid, cpu))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        stop.set()
        sampler.join()
    result = None
    for line in log.read_text().splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        elif line.startswith("world: "):
            print(f"[{shape}] {line}", flush=True)
    if rc != 0 or result is None:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise SystemExit(f"[{shape}] failed (exit {rc}); last lines of {log}:\n{tail}")
    result["peak_rss_gb"] = round(peak[0] / 1e9, 2)
    result["tree_cpu_s"] = round(sum(cpu.values()), 1)  # every process of the run, sampled every 0.5 s
    if not keep:
        import shutil

        shutil.rmtree(home, ignore_errors=True)
    return result


def report(r: dict) -> None:
    per_m = 1e6 / max(r["events"], 1)
    target = TARGET_S[r["shape"]]
    print(f"\n== {r['shape']}: {r['events']:,} events, whole graph {r['graph_s']:.1f} s "
          f"({r['graph_s'] * per_m:.0f} s/M events; target <= {target} s: {'MET' if r['graph_s'] <= target else 'MISSED'}), "
          f"ingest job {r['ingest_s']:.1f} s, peak RSS {r['peak_rss_gb']} GB, CPU {r['tree_cpu_s']} s "
          f"({r['tree_cpu_s'] * per_m:.0f} CPU-s/M events; whole run incl. generation), "
          f"success={r['success']}")
    print(f"   (before the graph: generate {r['generate_s']} s, read + resolve world {r['resolve_world_s']} s)")
    print(f"   {'step':<26}{'s':>9}{'s/M events':>12}")
    for step, sec in sorted(r["steps"].items(), key=lambda kv: -kv[1]):
        print(f"   {step:<26}{sec:>9.1f}{sec * per_m:>12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES + PROFILE_SHAPES)
    parser.add_argument("--keep", action="store_true", help="keep each shape's KAIROS_HOME (lake, logs)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--home", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.home))
        return
    results = [run_shape(shape, args.keep) for shape in args.shapes]
    for r in results:
        report(r)


if __name__ == "__main__":
    main()
