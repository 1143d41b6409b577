"""Ranking endpoint benchmark: load over HTTP, the in-process floor per stage, and a Redis-kill fault test.

    .venv/bin/python bench/ranking.py                      # 4 and 8 concurrent clients, 20 s each, then the fault test
    .venv/bin/python bench/ranking.py --clients 4 8 --seconds 15 --no-fault --home /tmp/kairos-bench
    .venv/bin/python bench/ranking.py --rates 10 20 30     # also the open-loop p99 at these arrival rates
    .venv/bin/python bench/ranking.py --driver httpx wrk --no-fault   # the closed loop with both drivers, one run
    .venv/bin/python bench/ranking.py --no-fault --vs KAIROS_PIPELINE_ON_LOOP=1 --repeat 2   # A/B, two servers, one run

Builds a fresh world through the real asset graph (Dagster, Spark, Delta, MLflow) in a
temporary KAIROS_HOME (or `--home`, reused on the next run) with an embedded redis-server, starts the
BentoML server (KAIROS_SERVE_WORKERS processes, one per core by default), and drives it at 200 candidates
with `clients` concurrent connections back to back (the closed loop): `--driver wrk` (the default when wrk is
on PATH; a C load generator, bench/wrk_load.py) or `--driver httpx` (Python client threads in this process,
which take a large share of the same cores). Each closed-loop row also says the CPU the load took: the
client's CPU time, the server's processes', Redis's and the rest of the machine's, as shares of the cores
over the load window. The open loop (a fixed arrival rate) runs bench/open_loop.py in a process of its own (asyncio on
raw keep-alive connections: wrk has no constant-rate mode, and Python client threads or this process's collector
would delay the sends); the fault test uses httpx. Prints p50/p95/p99, throughput, status codes and `served_by` counts;
the in-process floor per stage; the ranker alone compiled (lleaves) vs LightGBM on the same feature
matrices; the open-loop p99 at half the saturated rate; and the issue-21 figures, each against its
target computed from the in-process figures of the same run. For the fault test, Redis is SAVEd, killed
mid-load and restarted from its dump:
zero 5xx is required, `served_by` must show the fallback while it is down, and the
two-stage path must come back by itself.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _body(user: str, session: str, now_ms: int) -> dict:
    return {"user_id": user, "surface": "home_feed",
            "context": {"session_id": session, "device_type": "mobile", "timestamp_ms": now_ms, "geo_region": "eu"},
            "request_config": {"num_results": 10, "candidate_pool_size": 200, "max_latency_ms": 100}}


def _tree_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process and its live descendants (the server's workers)."""
    return sum(_tree_cpu_by_process(pid).values())


def _tree_cpu_by_process(pid: int | None) -> dict[int, float]:
    """User + system CPU seconds of each process of the tree (the supervisor and each worker), by pid."""
    import psutil

    if pid is None:
        return {}
    out: dict[int, float] = {}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def _tree_runq_s(pid: int | None) -> float:
    """Seconds the threads of a process and its live descendants spent runnable but waiting for a CPU (the
    scheduler's run queue, /proc/<pid>/task/<tid>/schedstat, second field): on a shared box, the time the server
    was ready to work and the neighbours had the cores."""
    import psutil

    if pid is None:
        return 0.0
    try:
        root = psutil.Process(pid)
        pids = [root.pid, *(p.pid for p in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in pids:
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


def _machine_busy_s() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


class CpuWindow:
    """CPU seconds the server tree, Redis and the whole machine used between start() and stop()."""

    def __init__(self, server_pid: int | None, redis_pid: int | None) -> None:
        self.server_pid, self.redis_pid = server_pid, redis_pid

    def start(self) -> CpuWindow:
        self._t = (time.perf_counter(), _tree_cpu_s(self.server_pid), _tree_cpu_s(self.redis_pid),
                   _machine_busy_s(), time.process_time(), _tree_runq_s(self.server_pid))
        self._by_process = _tree_cpu_by_process(self.server_pid)
        return self

    def stop(self) -> dict:
        w0, s0, r0, m0, p0, q0 = self._t
        after = _tree_cpu_by_process(self.server_pid)
        return {"server_by_process_s": sorted((round(after[p] - self._by_process.get(p, 0.0), 3) for p in after),
                                              reverse=True),"wall_s": time.perf_counter() - w0, "server_cpu_s": _tree_cpu_s(self.server_pid) - s0,
                "server_runq_s": _tree_runq_s(self.server_pid) - q0,
                "redis_cpu_s": _tree_cpu_s(self.redis_pid) - r0, "machine_cpu_s": _machine_busy_s() - m0,
                "bench_cpu_s": time.process_time() - p0}


def cpu_shares(window: dict, client_cpu_s: float, cores: int) -> dict:
    """Each party's CPU as a share of cores x wall over the load window; `other` = everything else on the box."""
    cap = max(window["wall_s"] * cores, 1e-9)
    other = window["machine_cpu_s"] - window["server_cpu_s"] - window["redis_cpu_s"] - client_cpu_s
    return {"client": client_cpu_s / cap, "server": window["server_cpu_s"] / cap, "redis": window["redis_cpu_s"] / cap,
            "other": max(other, 0.0) / cap, "client_per_server": client_cpu_s / max(window["server_cpu_s"], 1e-9)}


def sample_served_by(base: str, users: list[str], now_ms: int, n: int = 20) -> dict:
    """A few httpx requests after a load: status codes and `served_by`, read from the answers by Python."""
    import httpx

    codes: Counter = Counter()
    served: Counter = Counter()
    with httpx.Client(base_url=base, timeout=10) as http:
        for i in range(n):
            r = http.post("/v1/personalize", json=_body(users[(7919 * i) % len(users)], f"sample-{i % 7}", now_ms))
            codes[r.status_code] += 1
            served[r.json().get("served_by", "?") if r.status_code == 200 else f"http_{r.status_code}"] += 1
    return {"codes": dict(codes), "served_by": dict(served)}


def load(base: str, users: list[str], now_ms: int, clients: int, seconds: float,
         during: Callable[[], None] | None = None) -> dict:
    """`clients` threads post requests back to back for `seconds`; returns latencies, codes, served_by over time."""
    import httpx

    stop = time.time() + seconds
    lat: list[float] = []
    inside: list[float] = []  # the pipeline's own total, as the server reports it
    codes: Counter = Counter()
    served: list[tuple[float, str]] = []
    lock = threading.Lock()
    t0 = time.time()

    def worker(k: int) -> None:
        with httpx.Client(base_url=base, timeout=10) as http:
            i = k
            while time.time() < stop:
                t = time.perf_counter()
                try:
                    r = http.post("/v1/personalize", json=_body(users[i % len(users)], f"bench-{k}-{i % 7}", now_ms))
                    code = r.status_code
                    body = r.json() if code == 200 else {}
                    path = body.get("served_by", "?") if code == 200 else f"http_{code}"
                    pipeline_ms = (body.get("latency_breakdown_ms") or {}).get("total")
                except Exception as exc:  # noqa: BLE001 - a transport error is a failure, counted
                    code, path, pipeline_ms = 599, type(exc).__name__, None
                dt = (time.perf_counter() - t) * 1000
                with lock:
                    lat.append(dt)
                    if pipeline_ms is not None:
                        inside.append(float(pipeline_ms))
                    codes[code] += 1
                    served.append((time.time() - t0, path))
                i += clients

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    if during is not None:
        during()
    for th in threads:
        th.join()
    wall = time.time() - t0
    a = np.asarray(lat) if lat else np.asarray([np.nan])
    return {"clients": clients, "requests": len(lat), "rps": len(lat) / wall, "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)), "p99": float(np.percentile(a, 99)), "codes": dict(codes),
            "pipeline_p50": float(np.percentile(inside, 50)) if inside else float("nan"),
            "served_by": dict(Counter(p for _, p in served)), "timeline": served}


def in_process_floor(settings, users: list[str], now_ms: int, n: int = 300) -> tuple[dict[str, tuple[float, float]], dict]:
    """The pipeline in this process, one request at a time, with the ranker the server serves (compiled when
    available); and the ranker alone on the same requests' feature matrices, compiled vs LightGBM."""
    from features.online import OnlineStore
    from models.registry import load_alias
    from serving.compiled_ranker import CACHE_DIRNAME, attach
    from serving.pipeline import personalize
    from serving.settings import ServeSettings

    serve = ServeSettings.from_env()  # the settings the server started by this bench reads from the same environment
    bundle = load_alias(settings, alias="champion")
    t = time.perf_counter()
    attach(bundle, settings.home / CACHE_DIRNAME, background=False,  # what every server worker does, in a thread
           enabled=serve.compiled_ranker)
    compile_s = time.perf_counter() - t
    compiled = bundle.scorer
    matrices: list[np.ndarray] = []
    if compiled is not None:
        def capture(values: np.ndarray) -> np.ndarray:
            matrices.append(values)
            return compiled(values)

        bundle.use_scorer(capture, bundle.scorer_name)
    store = OnlineStore.from_url(settings.redis_url, timeout_s=0.5, item_cache_rows=serve.item_cache_rows,
                                 fresh_window=serve.fresh_window)
    store.warm()
    from serving.offline import one_thread_per_request

    stages: dict[str, list[float]] = {}
    with one_thread_per_request():  # torch and BLAS at one thread, as every server worker runs (serving/service.py)
        for k in range(n + 30):
            r = personalize(_body(users[k % len(users)], f"floor-{k % 7}", now_ms), bundle, store, rerank=serve.rerank,
                            stale_max_age_s=serve.stale_max_age_s)
            if k >= 30:
                for s, v in r["latency_breakdown_ms"].items():
                    stages.setdefault(s, []).append(v)
    floor = {s: (float(np.percentile(v, 50)), float(np.percentile(v, 99))) for s, v in stages.items()}
    ranker: dict = {"scorer": bundle.scorer_name, "compile_s": compile_s}
    if compiled is not None and matrices:
        lgbm, comp, diff = [], [], 0.0
        for x in matrices[30:]:  # interleaved on the same matrices: the machine's load hits both alike
            t = time.perf_counter()
            a = bundle.ranker.predict(x, num_threads=1)
            lgbm.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            b = compiled(x)
            comp.append((time.perf_counter() - t) * 1000)
            diff = max(diff, float(np.max(np.abs(a - b))))
        ranker.update(rows=int(np.median([m.shape[0] for m in matrices])), n=len(lgbm), max_abs_diff=diff,
                      lightgbm=(float(np.percentile(lgbm, 50)), float(np.percentile(lgbm, 99))),
                      compiled=(float(np.percentile(comp, 50)), float(np.percentile(comp, 99))))
    return floor, ranker


def profile_in_process(settings, users: list[str], now_ms: int, n: int = 500, top: int = 0) -> dict:
    """Per-request CPU of the pipeline in this process (time.process_time over `n` requests, one at a time, after
    30 warm-up ones), with the ranker and the impression log the server runs; `top` > 0 also prints cProfile's `top` functions by
    own time. What a change to the request path costs, measured without the HTTP server or the machine's load."""
    import cProfile
    import pstats

    from features.online import OnlineStore
    from models.registry import load_alias
    from serving.compiled_ranker import CACHE_DIRNAME, attach
    from serving.offline import one_thread_per_request
    from serving.pipeline import personalize
    from serving.settings import ServeSettings

    serve = ServeSettings.from_env()
    bundle = load_alias(settings, alias="champion")
    attach(bundle, settings.home / CACHE_DIRNAME, background=False, enabled=serve.compiled_ranker)
    store = OnlineStore.from_url(settings.redis_url, timeout_s=0.5, item_cache_rows=serve.item_cache_rows,
                                 fresh_window=serve.fresh_window)
    store.warm()
    from serving.impressions import ImpressionLogger

    # the impression log as a server worker keeps it (serving/service.py): the record with the shown items' feature
    # values built on the request path, written by its thread in this process (so in its CPU time)
    impressions = ImpressionLogger(store.client)

    def run(k: int) -> dict:
        return personalize(_body(users[k % len(users)], f"floor-{k % 7}", now_ms), bundle, store, rerank=serve.rerank,
                           stale_max_age_s=serve.stale_max_age_s, log_impression=impressions)

    import gc

    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    began: list[float] = [0.0]

    def on_gc(phase: str, info: dict) -> None:  # each collection's pause, per generation
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses[int(info["generation"])].append((time.perf_counter() - began[0]) * 1000)

    with one_thread_per_request():
        for k in range(30):
            run(k)
        wall: list[float] = []
        gc.callbacks.append(on_gc)
        cpu0 = time.process_time()
        for k in range(30, 30 + n):
            t = time.perf_counter()
            run(k)
            wall.append((time.perf_counter() - t) * 1000)
        impressions.flush()
        cpu_ms = (time.process_time() - cpu0) * 1000 / n
        gc.callbacks.remove(on_gc)
        # what a worker's background threads take from its interpreter, off the request path but holding its GIL:
        # one refresh poll (serving.model_slots: the registry read, the store warm) and a full collection
        from models.rollout import rollout_state

        background: dict[str, tuple[float, float]] = {}
        for name, fn in (("refresh: rollout_state", lambda: rollout_state(settings)), ("refresh: store.warm", store.warm),
                         ("gc.collect()", gc.collect)):
            fn()
            cpu, wall_b = [], []
            for _ in range(5):
                c, t = time.process_time(), time.perf_counter()
                fn()
                cpu.append((time.process_time() - c) * 1000)
                wall_b.append((time.perf_counter() - t) * 1000)
            background[name] = (float(np.median(cpu)), float(np.median(wall_b)))
        if top > 0:
            prof = cProfile.Profile(time.process_time)  # CPU time: a wait for Redis or the GIL is not own time
            prof.enable()
            for k in range(30, 30 + n):
                run(k)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(top)
    impressions.close()
    return {"n": n, "scorer": bundle.scorer_name, "cpu_ms": cpu_ms, "p50": float(np.percentile(wall, 50)),
            "p99": float(np.percentile(wall, 99)), "gc": {g: (len(v), float(np.sum(v)), max(v, default=0.0))
                                                         for g, v in pauses.items()},
            "gc_tracked": len(gc.get_objects()), "background": background}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--no-fault", action="store_true")
    parser.add_argument("--rates", type=float, nargs="*", default=[],
                        help="open-loop request rates (req/s) to report the p99 at, besides half the saturated rate")
    default_driver = "wrk" if shutil.which("wrk") else "httpx"
    parser.add_argument("--driver", nargs="+", choices=["wrk", "httpx"], default=[default_driver],
                        help="closed-loop load generator(s), run one after the other on the same server (default: "
                             f"wrk when on PATH, else httpx; here: {default_driver}); the open loop runs "
                             "bench/open_loop.py, the fault test httpx")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (event loops) for --driver wrk")
    parser.add_argument("--home", type=Path, default=None,
                        help="KAIROS_HOME to build the world in, or to reuse if a previous run built it there")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="only the in-process CPU per request over N requests (no server), then exit")
    parser.add_argument("--vs", nargs="+", default=[], metavar="KEY=VALUE",
                        help="A/B in one run: a second server with these environment variables on top (e.g. "
                             "KAIROS_PIPELINE_ON_LOOP=1); every load row runs on A, then on B")
    parser.add_argument("--repeat", type=int, default=1, help="run each load row this many times (A, B, A, B, ...); "
                                                              "the figures take the median")
    parser.add_argument("--cprofile", type=int, default=0, metavar="TOP",
                        help="with --profile: also print cProfile's TOP functions by own time")
    args = parser.parse_args()

    home = args.home.resolve() if args.home else Path(tempfile.mkdtemp(prefix="kairos-bench-ranking-"))
    home.mkdir(parents=True, exist_ok=True)
    built = home / ".bench-world-built"
    os.environ["KAIROS_HOME"] = str(home)
    for k in ("DAGSTER_HOME", "MLFLOW_TRACKING_URI", "KAIROS_LAKE_URI", "REDIS_URL"):
        os.environ.pop(k, None)
    os.environ.setdefault("KAIROS_ACCESS_LOG", "0")
    from lake.delta import DeltaLake
    from orchestration.cli import data_clock_ms, materialize_all, prepare_home
    from orchestration.services import free_port, start_redis
    from ground.settings import Settings
    from serving.server import start_server, stop_server, wait_ready

    settings = Settings.from_env()
    prepare_home(settings)
    redis_dir = home / "redis"
    redis = start_redis(redis_dir)
    os.environ["REDIS_URL"] = redis.url
    settings = Settings.from_env()
    if built.exists():
        print(f"[bench] reusing the world built in {home}", flush=True)
    else:
        print(f"[bench] building the world through the asset graph in {home} ...", flush=True)
        run = materialize_all(settings, {"source": "simulator"})
        print(f"[bench] asset graph: {run['seconds']:.0f}s", flush=True)
        built.touch()
    from models.registry import alias_version, mlflow_client

    if alias_version(settings, "champion") is None:
        # a latency benchmark needs a model serving: the simulator's small world can fail the quality gate (the
        # served NDCG vs the best baseline), which leaves no champion and every answer on the popularity path
        from training.rollout import promote

        versions = mlflow_client(settings).search_model_versions(f"name='{settings.model_name}'")
        latest = max(int(v.version) for v in versions)
        promote(settings, str(latest), reason="bench/ranking.py: the gate failed on this world; served to measure "
                                              "latency only", by="bench/ranking.py")
        print(f"[bench] no champion (gate failed on this world): version {latest} promoted for the measurement",
              flush=True)
    users = DeltaLake(settings.lake_uri).read("catalog_users", columns=["user_id"])["user_id"].tolist()
    now_ms = data_clock_ms(settings)

    if args.profile:
        prof = profile_in_process(settings, users, now_ms, args.profile, args.cprofile)
        print(f"\nIn-process CPU per request over {prof['n']} requests (time.process_time), ranker on "
              f"{prof['scorer']}: {prof['cpu_ms']:.3f} ms; wall p50 {prof['p50']:.2f} / p99 {prof['p99']:.2f} ms")
        print(f"Collections during them ({prof['gc_tracked']:,} objects tracked): "
              + "; ".join(f"gen {g}: {k} ({total:.1f} ms, max {worst:.2f} ms)" for g, (k, total, worst) in prof["gc"].items()))
        print("Off the request path, in a worker's interpreter (median of 5; CPU / wall ms): "
              + "; ".join(f"{name} {cpu:.1f} / {wall:.1f}" for name, (cpu, wall) in prof["background"].items()))
        redis.stop()
        return 0
    floor, ranker = in_process_floor(settings, users, now_ms)
    print(f"\nIn-process floor, one request at a time, 200 candidates, ranker on {ranker['scorer']} (p50 / p99 ms):")
    for s, (p50, p99) in floor.items():
        print(f"  {s:<22} {p50:7.2f} / {p99:7.2f}")
    if "compiled" in ranker:
        print(f"\nRanker inference alone, {ranker['rows']} candidates, same {ranker['n']} feature matrices "
              f"(p50 / p99 ms): LightGBM {ranker['lightgbm'][0]:.3f} / {ranker['lightgbm'][1]:.3f}, compiled "
              f"(lleaves) {ranker['compiled'][0]:.3f} / {ranker['compiled'][1]:.3f} -> "
              f"{ranker['lightgbm'][0] / ranker['compiled'][0]:.1f}x; max |diff| {ranker['max_abs_diff']:.1e}; "
              f"compile or cache load {ranker['compile_s']:.1f} s")
    else:
        print("\nRanker: compilation unavailable here, LightGBM serves (no compiled-vs-LightGBM figure)")
    from serving.settings import ServeSettings, cores as _cores

    workers = ServeSettings.from_env().worker_count  # what the server started below will run
    cores = _cores()

    env = {**os.environ, "KAIROS_HOME": str(home), "REDIS_URL": redis.url, "KAIROS_ACCESS_LOG": "0",
           "KAIROS_IMPRESSION_LOG": os.environ.get("KAIROS_IMPRESSION_LOG", "1")}
    # --vs: a second server with these variables on top, every load row run on A then on B (--repeat times), so
    # the comparison sees the same minutes of the shared machine; without it, one server labelled ""
    vs = dict(kv.split("=", 1) for kv in args.vs)
    variants: dict[str, dict[str, str]] = {"A": {}, "B": vs} if vs else {"": {}}
    procs: dict[str, subprocess.Popen] = {}
    bases: dict[str, str] = {}
    try:
        for label, extra in variants.items():
            port = free_port()
            while f"http://127.0.0.1:{port}" in bases.values():
                port = free_port()
            procs[label] = start_server(port, env={**env, **extra})
            bases[label] = f"http://127.0.0.1:{port}"
        for label in variants:
            wait_ready(bases[label], timeout_s=180, proc=procs[label])
            load(bases[label], users, now_ms, 2, 3.0)  # warm-up
        if vs:
            print(f"\n[bench] A/B in one run: server A as configured, server B with {' '.join(args.vs)}; each load "
                  f"row runs on A, then on B, {args.repeat} time(s); the figures below take the median of the repeats")
        import httpx

        for label in variants:
            with httpx.Client(base_url=bases[label], timeout=10) as http:  # the HTTP floor: a route that does nothing
                probe = []
                for _ in range(300):
                    t = time.perf_counter()
                    http.get("/healthz")
                    probe.append((time.perf_counter() - t) * 1000)
            print(f"\nHTTP floor{' ' + label if label else ''} (GET /healthz, 1 client): p50 {np.percentile(probe, 50):.2f} ms, "
                  f"p99 {np.percentile(probe, 99):.2f} ms")
        drivers = list(dict.fromkeys(args.driver))
        print(f"\n[bench] load average before the HTTP load: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"\nHTTP load, closed loop, 200 candidates, {workers} BentoML worker(s) on {cores} core(s), "
              f"driver(s) {', '.join(drivers)} (pipeline = the server's own total, p50; CPU = share of "
              f"{cores} cores x the load window: client / server / redis / rest of the machine; srv ms/req = the "
              f"server's CPU per request; runq ms/req = the time its threads were runnable but waited for a CPU, "
              f"per request):")
        print(f"  {'':>2} {'driver':>6} {'clients':>7} {'requests':>8} {'req/s':>7} {'p50':>7} {'p95':>7} {'p99':>7} "
              f"{'pipeline':>8} {'cpu c/s/r/o':>20} {'c/s':>5} {'srv ms/req':>10} {'runq ms/req':>11}  codes / served_by")
        closed: dict[str, dict[str, dict[int, list[dict]]]] = {v: {d: {} for d in drivers} for v in variants}
        redis_pid = getattr(getattr(redis, "process", None), "pid", None)
        for driver in drivers:
            for c in args.clients:
                for _rep in range(args.repeat):
                    for label in variants:
                        base, proc = bases[label], procs[label]
                        window = CpuWindow(proc.pid, redis_pid).start()
                        if driver == "wrk":
                            from bench.wrk_load import wrk_load

                            r = wrk_load(base, users, now_ms, c, args.seconds, threads=args.wrk_threads)
                            win = window.stop()
                            client_cpu = r["client_cpu_s"]
                        else:
                            r = load(base, users, now_ms, c, args.seconds)
                            win = window.stop()
                            client_cpu = win["bench_cpu_s"]  # this process: the client threads (the main thread waits)
                            r["non_2xx"] = sum(n for code, n in r["codes"].items() if not 200 <= int(code) < 300)
                        r["cpu"] = cpu_shares(win, client_cpu, cores)
                        # the server's CPU per answered request (all its processes): the pipeline's (--profile) + HTTP's
                        r["server_cpu_ms"] = win["server_cpu_s"] * 1000 / max(r["requests"], 1)
                        r["server_runq_ms"] = win["server_runq_s"] * 1000 / max(r["requests"], 1)
                        closed[label][driver].setdefault(c, []).append(r)
                        cpu = r["cpu"]
                        print(f"  {label:>2} {driver:>6} {c:>7} {r['requests']:>8} {r['rps']:>7.1f} {r['p50']:>7.1f} {r['p95']:>7.1f} "
                              f"{r['p99']:>7.1f} {r['pipeline_p50']:>8.1f} "
                              f"{cpu['client']:>5.1%} /{cpu['server']:>4.0%} /{cpu['redis']:>4.0%} /{cpu['other']:>4.0%} "
                              f"{cpu['client_per_server']:>5.2f} {r['server_cpu_ms']:>10.2f} {r['server_runq_ms']:>11.2f}  non-2xx {r['non_2xx']} {r['codes']} {r['served_by']}", flush=True)
                        print(f"  {'':>2} {'':>6} {'':>7} server CPU by process, busiest first (ms/req): "
                              + " / ".join(f"{s * 1000 / max(r['requests'], 1):.2f}" for s in win["server_by_process_s"]),
                              flush=True)
                        if driver == "wrk":
                            sample = sample_served_by(base, users, now_ms)
                            print(f"  {'':>2} {'':>6} {'':>7} after it, 20 httpx requests: {sample['codes']} {sample['served_by']}",
                                  flush=True)

        def median_of(rows: list[dict], key: str) -> float:
            return float(np.median([r[key] for r in rows]))

        saturated = {(v, d): max(median_of(rows, "rps") for rows in by_c.values())
                     for v, by_driver in closed.items() for d, by_c in by_driver.items() if by_c}
        halves = {k: round(s / 2) for k, s in saturated.items()}
        rates = list(dict.fromkeys(list(args.rates or []) + [h for h in halves.values() if h]))
        open_at: dict[tuple[str, float], list[dict]] = {}
        if rates:
            from bench.open_loop import open_loop

            print("\nOpen loop (bench/open_loop.py, its own process: fixed arrival rate, latency from the scheduled send "
                  "time; lag = how late the generator sent, wait = queued for the worker's pipeline slot, app = the "
                  "pipeline, both from the server-timing header; srv / runq ms/req = the server's CPU and run-queue "
                  "wait per request; tail = mean split of the requests at or above the p99: lag + wait + app + "
                  "rest = the worker's event loop, HTTP, network), 200 candidates:")
            print(f"  {'':>2} {'req/s':>7} {'requests':>8} {'p50':>7} {'p95':>7} {'p99':>7} {'lag p99':>7} {'wait p99':>8} "
                  f"{'app p99':>7} {'client':>6} {'srv ms/req':>10} {'runq ms/req':>11}  tail: latency = lag + wait + app + rest  codes")
            for rate in rates:
                for _rep in range(args.repeat):
                    for label in variants:
                        window = CpuWindow(procs[label].pid, redis_pid).start()
                        r = open_loop(bases[label], users, now_ms, rate, args.seconds)
                        open_at.setdefault((label, rate), []).append(r)
                        win = window.stop()
                        r["server_cpu_ms"] = win["server_cpu_s"] * 1000 / max(r["requests"], 1)
                        r["server_runq_ms"] = win["server_runq_s"] * 1000 / max(r["requests"], 1)
                        which = [d for (v, d), h in halves.items() if h == rate and v == label]
                        tail = r.get("tail") or {}
                        print(f"  {label:>2} {rate:>7.0f} {r['requests']:>8} {r['p50']:>7.1f} {r['p95']:>7.1f} {r['p99']:>7.1f} "
                              f"{r['send_lag_p99']:>7.1f} {r['wait_p99']:>8.1f} {r['app_p99']:>7.1f} "
                              f"{r['client_cpu_s'] / max(r['wall_s'] * cores, 1e-9):>6.1%} {r['server_cpu_ms']:>10.2f} "
                              f"{r['server_runq_ms']:>11.2f}  "
                              f"{tail.get('latency', float('nan')):.1f} = {tail.get('send_lag', float('nan')):.1f} + "
                              f"{tail.get('wait', float('nan')):.1f} + {tail.get('app', float('nan')):.1f} + "
                              f"{tail.get('rest', float('nan')):.1f}  {r['codes']}"
                              + (f"  (half the saturated rate, {'/'.join(which)})" if which else ""), flush=True)
        print(f"\n[bench] load average after the HTTP load: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        p50, p99 = floor["total"]
        print("\nIssue 21 figures (one run; targets from the in-process figures of this same run"
              + (f"; median of {args.repeat} repeats" if args.repeat > 1 else "") + "):")
        target = 0.7 * cores * 1000 / p50
        print(f"  in process: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        for label in variants:
            tag = f"{label + ' ' if label else ''}{'with ' + ' '.join(args.vs) + ' ' if label == 'B' else ''}"
            for driver, by_c in closed[label].items():
                if not by_c:
                    continue
                best = max(by_c, key=lambda c: median_of(by_c[c], "rps"))
                sat = saturated[(label, driver)]
                row = by_c[best]
                print(f"  {tag}[{driver}] saturated throughput {sat:.0f} req/s ({best} clients) vs 0.7 x {cores} cores x 1000 / "
                      f"{p50:.2f} ms = {target:.0f} req/s: {sat / target:.2f} of the target "
                      f"({'met' if sat >= target else 'NOT met'}); client CPU {np.median([r['cpu']['client'] for r in row]):.1%} of the "
                      f"cores, server {np.median([r['cpu']['server'] for r in row]):.0%}, rest of the machine "
                      f"{np.median([r['cpu']['other'] for r in row]):.0%}")
                # what the server's own CPU cost allows when it has the cores to itself (neighbours' load taken out):
                # cores x 1000 / the server's CPU ms per request, at the saturated row
                srv_ms = median_of(row, "server_cpu_ms")
                capacity = cores * 1000 / max(srv_ms, 1e-9)
                print(f"  {tag}[{driver}] server CPU per request {srv_ms:.2f} ms (in process, pipeline only: "
                      f"see --profile) -> {capacity:.0f} req/s on {cores} cores at 100% = {capacity / target:.2f} of the target")
                at_half = open_at.get((label, halves[(label, driver)]))
                if at_half:
                    half_p99 = median_of(at_half, "p99")
                    print(f"  {tag}[{driver}] p99 at half the saturated rate ({halves[(label, driver)]} req/s, open loop, "
                          f"bench/open_loop.py) {half_p99:.1f} ms vs 2 x in-process p99 = {2 * p99:.1f} ms: "
                          f"{half_p99 / (2 * p99):.2f} ({'met' if half_p99 <= 2 * p99 else 'NOT met'})")
                if 4 in by_c:
                    pipe = median_of(by_c[4], "pipeline_p50")
                    print(f"  {tag}[{driver}] server pipeline p50 under 4 clients {pipe:.2f} ms vs 1.5 x in-process p50 = "
                          f"{1.5 * p50:.2f} ms: {pipe / p50:.2f} x in-process ({'met' if pipe <= 1.5 * p50 else 'NOT met'})")
        if "compiled" in ranker:
            print(f"  ranker at {ranker['rows']} candidates: compiled p50 {ranker['compiled'][0]:.3f} ms vs LightGBM "
                  f"{ranker['lightgbm'][0]:.3f} ms ({ranker['lightgbm'][0] / ranker['compiled'][0]:.1f}x), "
                  f"max |diff| {ranker['max_abs_diff']:.1e}")
        base = bases[next(iter(variants))]
        if not args.no_fault:
            import redis as redis_lib

            client = redis_lib.Redis.from_url(redis.url)
            client.save()  # the restart below comes back with the same data, as a real Redis with persistence would
            box: dict = {}

            def chaos() -> None:
                time.sleep(4)
                box["down_at"] = time.time()
                redis.stop()
                time.sleep(4)
                box["revived"] = start_redis(redis_dir, port=redis.port)
                box["up_at"] = time.time()

            r = load(base, users, now_ms, 4, 16.0, during=chaos)
            timeline = r["timeline"]  # (seconds since the load started, served_by); chaos runs on that clock
            phases = {"before": Counter(), "redis down": Counter(), "after restart": Counter()}
            first_two_stage_after = None
            for t, path in timeline:
                if t < 4:
                    phases["before"][path] += 1
                elif t < 8:
                    phases["redis down"][path] += 1
                else:
                    phases["after restart"][path] += 1
                    if path == "two_stage" and first_two_stage_after is None:
                        first_two_stage_after = t - 8
            five_xx = sum(n for code, n in r["codes"].items() if int(code) >= 500)
            print("\nFault test: Redis killed 4 s into a 16 s load (4 clients), restarted 4 s later:")
            print(f"  requests {r['requests']}, status codes {r['codes']}, 5xx: {five_xx}")
            for phase, counts in phases.items():
                print(f"  {phase:<14} {dict(counts)}")
            print(f"  two_stage again {first_two_stage_after:.2f} s after the restart" if first_two_stage_after is not None
                  else "  two_stage did NOT come back")
            print(f"  latency during the fault run: p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms")
            if box.get("revived") is not None:
                box["revived"].stop()
    finally:
        for proc in procs.values():
            stop_server(proc)
        redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
