"""`kairos` command line: the main demo job and the long-running processes.

    kairos demo      start embedded Redis, materialize every asset, deploy, serve and print ranked lists
    kairos redis     run the embedded redis-server in the foreground
    kairos serve     run the BentoML ranking server
    kairos stream    run the streaming job (Redis Stream -> session keys + bronze micro-batches; --help: flags)
    kairos ui        run the Dagster UI over this project's instance
    kairos lineage   the lineage of a model version (--version N) or of a served request (--request-id R)
    kairos forget    forget a user everywhere (--user U --by NAME --reason TEXT), with an audit entry
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from typing import Any
from pathlib import Path

from ground.settings import (LIVE, PROJECT_ROOT, RedisConnectionSettings, Settings, redact_url, redis_client,
                             redis_url_from_env)
from ingestion.sources import SOURCES

log = logging.getLogger("kairos")

# Dagster's gRPC client binds its call timeout when dagster is first imported: a run launched through the run
# launcher asks the code server to start it, and on a busy 2-core machine that call once took longer than the 60 s
# default (`DagsterUserCodeUnreachableError`). Set (unless already set) by every entry point before it imports
# dagster; the processes it starts (`kairos ui`'s `dagster dev`, code servers, run workers) inherit it.
DAGSTER_CLIENT_ENV = {"DAGSTER_GRPC_TIMEOUT_SECONDS": "600"}


def use_dagster_client_env() -> None:
    """DAGSTER_CLIENT_ENV into this process's environment (where dagster reads it), keeping values already set."""
    for name, value in DAGSTER_CLIENT_ENV.items():
        os.environ.setdefault(name, value)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    for noisy in ("py4j", "alembic", "mlflow", "urllib3", "httpx", "faiss", "numexpr", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def prepare_home(settings: Settings) -> None:
    """KAIROS_HOME and a DAGSTER_HOME inside it, so `kairos ui` shows the demo's runs (and the Dagster client's
    timeout, for the scripts that call this before they launch jobs)."""
    use_dagster_client_env()
    settings.home.mkdir(parents=True, exist_ok=True)
    dagster_home = Path(os.environ.get("DAGSTER_HOME") or settings.home / "dagster")
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").touch(exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    os.environ.setdefault("KAIROS_HOME", str(settings.home))
    os.environ.setdefault("MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri)


def ensure_redis(settings: Settings):
    """REDIS_URL if set; otherwise start the embedded redis-server and publish its URL."""
    if settings.redis_url:
        return None
    from orchestration.services import start_redis

    server = start_redis(settings.home / "redis", password=RedisConnectionSettings.from_env().password)
    (settings.home / "redis.url").write_text(server.url)
    os.environ["REDIS_URL"] = server.url
    return server


def materialize_all(settings: Settings, source_config: dict, build_ops: dict | None = None) -> dict:
    """Backfill every ingest day of the source as one partitioned run, then build everything downstream.

    Two Dagster runs launched through the instance's run launcher, as the UI launches them (so they show
    under their jobs; a Dagster job cannot mix daily-partitioned and unpartitioned assets); each runs its
    steps in one run worker (one Spark session). Returns the build run's id and per-run seconds.
    `build_ops`: run config of the build job's assets (a world's split, labels, gate...); by default MovieLens
    gets the last 20% of its log as the test window.
    """
    from assets.ingestion import SourceConfig, daily_partitions, source_partitions
    from orchestration.launch import IN_PROCESS, launch_job
    from orchestration.world import KNOWN_SPLITS

    t0 = time.perf_counter()
    days = source_partitions(SourceConfig(**source_config))
    known = set(daily_partitions.get_partition_keys())
    outside = [d for d in days if d not in known]
    if outside:
        raise SystemExit(f"the source's events arrive on days {outside[0]}..{outside[-1]} outside the daily partitions "
                         f"({settings.partition_start}..{settings.partition_end or 'today'}): set KAIROS_PARTITION_START / "
                         "KAIROS_PARTITION_END=YYYY-MM-DD to the first / last day")
    ingest = launch_job("ingest_events", {**IN_PROCESS, "ops": {"bronze_events": {"config": source_config}}},
                        tags={"dagster/asset_partition_range_start": days[0], "dagster/asset_partition_range_end": days[-1]})
    t_ingest = time.perf_counter() - t0
    log.info("Dagster ingest run %s: %d days (%s..%s) in %.1fs", ingest.run_id, len(days), days[0], days[-1], t_ingest)
    ops: dict = {"catalog": {"config": source_config}}
    if source_config.get("source") in KNOWN_SPLITS:  # MovieLens: the last 20% of the log (orchestration/world.py)
        ops["training_set"] = {"config": dict(KNOWN_SPLITS[source_config["source"]])}
    ops.update(build_ops or {})
    build = launch_job("build", {**IN_PROCESS, "ops": ops})
    seconds = time.perf_counter() - t0
    log.info("Dagster build run %s %s in %.1fs", build.run_id, "succeeded" if build.success else "FAILED",
             seconds - t_ingest)
    return {"run_id": build.run_id, "ingest_run_id": ingest.run_id, "success": ingest.success and build.success,
            "seconds": seconds, "ingest_seconds": t_ingest, "days": len(days)}


def data_clock_ms(settings: Settings) -> int:
    """'Now' for demo requests: an hour after the newest feature snapshot (the midnight after the last event).

    The online store serves that snapshot; a request stamped after it sees what training would have seen
    at the same moment, so the train/serve skew check compares like with like.
    """
    from lake.delta import DeltaLake

    lake = DeltaLake(settings.lake_uri)
    newest = int(lake.read("user_features", columns=["feature_ts"])["feature_ts"].max())
    last_event = int(lake.read("silver_events", columns=["timestamp"])["timestamp"].max())
    return max(newest, last_event) + 3_600_000


def log_impressions(settings: Settings) -> dict:
    """Run the `log_impressions` job: land served impressions in Delta and run the skew check."""
    from orchestration.launch import IN_PROCESS, launch_job

    result = launch_job("log_impressions", IN_PROCESS)
    passed, metadata = result.check_evaluations.get("served_features_match_offline", (False, {}))
    return {"run_id": result.run_id, "skew_passed": passed, "skew": metadata}


def _print_ranked(title: str, response: dict, categories: dict[str, str]) -> None:
    print(f"\n{title}  (served_by={response.get('served_by')}, model_version={response.get('model_version')}, "
          f"latency={response.get('latency_breakdown_ms', {})})")
    for item in response.get("ranked_items", []):
        print(f"  {item['rank']:>2}. {item['item_id']:<10} {categories.get(item['item_id'], '?'):<10} score={item['score']:.4f}")


def _print_quality() -> None:
    """The catalog evaluation and the gate's verdict of the build run (what decides whether a model serves)."""
    from dagster import AssetKey, DagsterInstance

    instance = DagsterInstance.get()

    def metadata(asset: str) -> dict[str, Any] | None:
        """The latest materialization's metadata values of `asset` (None: never materialized)."""
        event = instance.get_latest_materialization_event(AssetKey(asset))
        materialization = event.asset_materialization if event is not None else None
        return {k: v.value for k, v in materialization.metadata.items()} if materialization is not None else None

    evaluation, meta = metadata("model_evaluation"), metadata("validation_gate")
    if evaluation is None or meta is None:
        return
    catalog = evaluation["table"].get("catalog") or {}
    systems = catalog.get("systems", {})
    split = catalog.get("split", {})
    print(f"\nServed top-10 over the whole catalog at the test window's start ({split.get('users')} test users, "
          f"{split.get('warm_users')} with history), NDCG@10 [95% CI]:")
    for name in sorted(systems, key=lambda n: -float(systems[n].get("ndcg_at_10") or 0)):
        m = systems[name]
        print(f"  {name:<32} {m['ndcg_at_10']:.4f} [{m['ndcg_at_10_ci_low']:.4f}, {m['ndcg_at_10_ci_high']:.4f}]  "
              f"recall@10 {m['recall_at_10']:.4f}  coverage {m['catalog_coverage']:.3f}")
    print(f"Validation gate {'PASSED' if meta['passed'] else 'FAILED'}:")
    for reason in meta["reasons"]:
        print(f"  {reason}")


def demo(args: argparse.Namespace) -> int:
    """The main job on embedded defaults: everything real, end to end."""
    import httpx

    from lake.delta import DeltaLake
    from serving.server import start_server, stop_server, wait_ready
    from orchestration.services import free_port
    from streaming.job import SessionStreamProcessor, publish

    started = time.perf_counter()
    world = resolve_demo_world(args)
    settings = Settings.from_env()
    prepare_home(settings)
    server_redis = ensure_redis(settings)
    settings = Settings.from_env()

    print(f"Kairos demo: home={settings.home} redis={redact_url(settings.redis_url)} "
          f"mlflow={redact_url(settings.mlflow_tracking_uri)}")
    run = materialize_all(settings, world.source, world.ops)
    pipeline_s = run["seconds"]
    _print_quality()

    items = DeltaLake(settings.lake_uri).read("catalog_items", columns=["item_id", "category"])
    categories = dict(zip(items["item_id"], items["category"]))
    port = args.port or free_port()
    env = {**os.environ, "REDIS_URL": settings.redis_url or "", "KAIROS_HOME": str(settings.home),
           "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri}
    proc = start_server(port, env=env)
    stop = threading.Event()
    client = redis_client(redis_url_from_env(settings))  # the URL ensure_redis set; password / TLS from the environment
    processor = SessionStreamProcessor(client, consumer_name="demo")
    processor.ensure_group()
    thread = threading.Thread(target=processor.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, timeout_s=180)
        users = DeltaLake(settings.lake_uri).read("catalog_users", columns=["user_id", "device_type"])
        session_id = f"demo-session-{int(time.time())}"
        now_ms = data_clock_ms(settings)
        served: list[str | None] = []
        with httpx.Client(base_url=base, timeout=30) as http:
            for user_id in users["user_id"].head(3):
                body = {"user_id": user_id, "surface": "home_feed",
                        "context": {"session_id": f"{session_id}-{user_id}", "device_type": "mobile", "timestamp_ms": now_ms,
                                    "geo_region": "eu"},
                        "request_config": world.serving}
                response = http.post("/v1/personalize", json=body).json()
                served.append(response.get("served_by"))
                _print_ranked(f"Top-{world.serving['num_results']} for {user_id}", response, categories)

            user_id = str(users["user_id"].iloc[0])
            body = {"user_id": user_id, "surface": "home_feed",
                    "context": {"session_id": session_id, "device_type": "mobile", "timestamp_ms": now_ms, "geo_region": "eu"},
                    "request_config": world.serving}
            before = http.post("/v1/personalize", json=body).json()
            shown = Counter(categories.get(i["item_id"]) for i in before["ranked_items"])
            target = min(sorted(set(categories.values())), key=lambda c: shown.get(c, 0))
            clicked = [i for i, c in categories.items() if c == target][:3]
            events = [{"event_id": f"demo-{session_id}-{k}", "user_id": user_id, "item_id": item, "event_type": "click",
                       "timestamp": now_ms + 1000 * (k + 1), "session_id": session_id, "position": k,
                       "page_context": "home_feed", "device_type": "mobile", "dwell_time_ms": 40_000, "schema_version": 1}
                      for k, item in enumerate(clicked)]
            publish(client, events)
            deadline = time.time() + 10
            while time.time() < deadline and not client.exists(f"kairos:session:{session_id}"):
                time.sleep(0.01)
            body["context"]["timestamp_ms"] = now_ms + 5000
            after = http.post("/v1/personalize", json=body).json()
            _print_ranked(f"Before clicks, {user_id} (category {target}: {shown.get(target, 0)}/10)", before, categories)
            after_share = sum(1 for i in after["ranked_items"] if categories.get(i["item_id"]) == target)
            _print_ranked(f"After three clicks in {target} ({after_share}/10 from {target})", after, categories)
            for uid in users["user_id"].head(60):  # some traffic for the impression log and the skew check
                http.post("/v1/personalize", json={**body, "user_id": uid,
                                                   "context": {**body["context"], "session_id": f"{session_id}-{uid}"}})
            status = http.post("/v1/status", json={}).json()
        time.sleep(0.5)  # the server logs impressions asynchronously
        skew = log_impressions(settings)
        if skew["skew"].get("rows"):
            verdict = (f"{'PASSED' if skew['skew_passed'] else 'FAILED'} over {skew['skew'].get('rows')} served rows "
                       f"(worst feature {skew['skew'].get('worst_feature')}: mismatch rate "
                       f"{skew['skew'].get('worst_mismatch_rate')})")
        else:
            verdict = "not evaluated: no model-served impressions (popularity fallback logs no features)"
        print(f"\nImpression log: {status.get('impressions')}; train/serve skew check {verdict}")
    finally:
        stop.set()
        thread.join(timeout=5)
        stop_server(proc)
        if server_redis is not None:
            server_redis.stop()
    print(f"\nDagster runs {run['ingest_run_id']} (ingest, {run['days']} daily partitions, {run['ingest_seconds']:.1f}s) "
          f"and {run['run_id']} (build): whole asset graph in {pipeline_s:.1f}s; demo wall time {time.perf_counter() - started:.1f}s")
    print("Open the Dagster UI with `make ui`, MLflow with `make mlflow-ui` (http://127.0.0.1:5000: click \"Model "
          "training\" at the top left once, MLflow 3.17 opens in its GenAI view).")
    if not any(str(by).startswith(SERVED_BY_MODEL) for by in served):
        print(f"\n{'!' * 100}\nNO MODEL SERVES: every demo answer came from {sorted(set(map(str, served)))}, not the "
              f"trained model ({SERVED_BY_MODEL}).\nCheck the validation_gate result of build run {run['run_id']} "
              "(`make ui`): a model that fails the gate is not promoted to champion. Fix the data or relax the "
              f"world's `gate` config.\n{'!' * 100}")
        return 3
    return 0


# serving.pipeline.SERVED_TWO_STAGE, also the prefix of its stale-features path (not imported: it loads the serving stack)
SERVED_BY_MODEL = "two_stage"


def _demo_spec(args: argparse.Namespace) -> dict:
    """The world spec of a demo: the --config file, with command-line source options on top."""
    from orchestration.world import load_world_file

    spec = load_world_file(args.config) if args.config else {}
    if args.source:
        spec["source"] = args.source
    spec.setdefault("source", "simulator")
    if args.path:
        spec["path"] = str(Path(args.path).resolve())
    if spec["source"] == "simulator":
        sim = dict(spec.get("simulator") or {})
        for key, value in (("n_users", args.users), ("n_items", args.items), ("days", args.days), ("seed", args.seed)):
            if value is not None:
                sim[key] = value
        spec["simulator"] = sim
    if args.mapping or args.delimiter or args.encoding:
        try:
            mapping = json.loads(args.mapping) if args.mapping else dict(spec.get("mapping") or {})
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--mapping is not valid JSON ({exc}); e.g. "
                             '\'{"user": "uid", "item": "sku", "timestamp": "ts"}\'') from exc
        if args.delimiter:
            mapping["delimiter"] = "\t" if args.delimiter in ("\\t", "tab", "TAB") else args.delimiter
        if args.encoding:
            mapping["encoding"] = args.encoding
        spec["mapping"] = mapping
    for section, path, mapping in (("catalog", args.catalog, args.catalog_mapping),
                                   ("users", args.users_file, args.users_mapping)):
        if path:
            spec[section] = {"path": str(Path(path).resolve()), "mapping": mapping or None}
    return spec


def resolve_demo_world(args: argparse.Namespace):
    """Read the source once, derive partitions / split / labels, and refuse an untrainable world now.

    Sets KAIROS_PARTITION_START / KAIROS_PARTITION_END to the data's first / last ingest day (unless set)
    before the assets are imported, so the daily partitions are the log's days (not hundreds of empty ones up to
    today), and records them under KAIROS_HOME for later processes on that home (`make ui`); prints what the
    data decided.
    """
    from ingestion.generic import ImportError_
    from orchestration.world import WorldError, resolve_world

    try:
        world = resolve_world(_demo_spec(args))
    except (WorldError, ImportError_, ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"kairos demo: {exc}") from exc
    chosen = os.environ.get("KAIROS_PARTITION_START")
    if not chosen:
        os.environ["KAIROS_PARTITION_START"] = world.partition_start
    elif chosen > world.partition_start:
        raise SystemExit(f"kairos demo: KAIROS_PARTITION_START={chosen} is after the data's first day "
                         f"{world.partition_start}: unset it (the demo derives it) or set it to that day or earlier")
    end = os.environ.get("KAIROS_PARTITION_END")
    if not end:
        os.environ["KAIROS_PARTITION_END"] = end = world.partition_end or LIVE
    elif end.lower() != LIVE and world.partition_end and end < world.partition_end:
        raise SystemExit(f"kairos demo: KAIROS_PARTITION_END={end} is before the data's last ingest day "
                         f"{world.partition_end}: unset it (the demo derives it), set it to that day or later, or to "
                         f"{LIVE} (partitions through today)")
    settings = Settings.from_env()
    settings.record_partition_start(os.environ["KAIROS_PARTITION_START"])  # for `make ui` on this home
    settings.record_partition_end(settings.partition_end)
    print(world.describe())
    print(f"daily partitions {settings.partition_start}..{settings.partition_end or 'today (live)'} (recorded in "
          "KAIROS_HOME/partition_start and partition_end for `make ui` on this home)")
    return world


def cmd_redis(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    prepare_home(settings)
    from orchestration.services import start_redis

    # with REDIS_PASSWORD set the server requires it (requirepass); clients read the same variable
    server = start_redis(settings.home / "redis", port=args.port or None, password=RedisConnectionSettings.from_env().password)
    (settings.home / "redis.url").write_text(server.url)
    print(f"embedded redis-server at {server.url} (URL written to {settings.home / 'redis.url'}); append-only file in "
          f"{server.workdir} with appendfsync {server.appendfsync}: acknowledged writes survive a crash; Ctrl-C stops it")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.server import main as serve_main

    prepare_home(Settings.from_env())
    return serve_main([] if not args.port else ["--port", str(args.port)]) or 0


def cmd_stream(args: argparse.Namespace) -> int:
    from streaming.job import main as stream_main
    from streaming.options import options_from_args

    settings = Settings.from_env()
    prepare_home(settings)
    _warn_if_not_durable(settings)
    return stream_main(opts=options_from_args(args)) or 0


def _warn_if_not_durable(settings: Settings) -> None:
    """Say so when the Redis the stream lives in would lose acknowledged events on a crash (README "Durability")."""
    from orchestration.services import redis_durability

    url = redis_url_from_env(settings)
    try:
        info = redis_durability(redis_client(url, socket_timeout=5))
    except Exception as exc:  # noqa: BLE001 - CONFIG may be disabled on a managed Redis: say what to check
        logging.getLogger("kairos").warning("could not read the persistence settings of %s (%s): make sure it runs "
                                            "with appendonly yes and appendfsync always", redact_url(url), exc)
        return
    if not info["durable"]:
        logging.getLogger("kairos").warning(
            "Redis at %s runs with appendonly %s, appendfsync %s: a crash loses %s. Set `appendonly yes` and "
            "`appendfsync always` (README \"Durability\")", redact_url(url), info["appendonly"], info["appendfsync"],
            info["loss_window"])


def cmd_lineage(args: argparse.Namespace) -> int:
    """Print the lineage of a model version, or of the version that answered a request."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from compliance.lineage import lineage_for_version, render_html, request_lineage, summary

    settings = Settings.from_env()
    prepare_home(settings)
    if bool(args.version) == bool(args.request_id):
        raise SystemExit("kairos lineage: give exactly one of --version N or --request-id R")
    try:
        if args.request_id:
            client = None
            try:
                client = redis_client(redis_url_from_env(settings), socket_timeout=10)
            except RuntimeError:  # no Redis configured: the Delta impression log alone
                pass
            doc = request_lineage(settings, args.request_id, redis_client=client)
            lineage = doc["lineage"]
        else:
            lineage = lineage_for_version(settings, str(args.version))
            doc = lineage
    except LookupError as exc:
        raise SystemExit(str(exc)) from exc
    if args.html:
        Path(args.html).write_text(render_html(lineage))
    if args.json:
        print(json.dumps(doc, indent=2, sort_keys=True, default=str))
    else:
        if args.request_id:
            r = doc["request"]
            print(f"request {r['request_id']} ({r['source']}): user {r['user_id']} at {r['request_at']}, "
                  f"served_by {r['served_by']}, model version {r['model_version']}, feature version "
                  f"{r['feature_version']}, {len(r['items'])} items")
        print(summary(lineage))
        if args.html:
            print(f"HTML report written to {args.html}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    """Forget a user in every store (Redis, Delta + vacuum), exclude them from ingestion/training, audit it."""
    from compliance.forget import ForgetIncomplete, forget_user

    settings = Settings.from_env()
    prepare_home(settings)
    try:
        row = forget_user(settings, args.user, requested_by=args.by, reason=args.reason,
                          retention_hours=args.retention_hours)
    except (ValueError, ForgetIncomplete) as exc:
        raise SystemExit(f"kairos forget: {exc}") from exc
    deleted = json.loads(row["deleted"])
    print(f"forgot user (hash {row['user_hash'][:16]}…), audit request {row['request_id']}: "
          f"{row['total_deleted']} rows/keys/entries deleted")
    for what, n in sorted(deleted.items()):
        print(f"  {what:<32} {n}")
    print("old table versions purged now" if args.retention_hours <= 0 else
          f"old table versions readable for {args.retention_hours} h more (lake_maintenance vacuums them)")
    pending = json.loads(row["pending"] or "{}")
    if pending.get("model_bundles"):
        print(f"still holding the user: {len(pending['model_bundles'])} model bundle(s) trained before the request; "
              f"to do: {pending['action']}")
        for path in pending["model_bundles"]:
            print(f"  {path}")
    if pending.get("other_files"):
        print(f"other files under KAIROS_HOME naming the user ({pending['other_files_note']}):")
        for path in pending["other_files"]:
            print(f"  {path}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    prepare_home(settings)
    print(f"Dagster UI over DAGSTER_HOME={os.environ['DAGSTER_HOME']}; daily partitions "
          f"{settings.partition_start}..{settings.partition_end or 'today (live)'}")
    os.execvp(str(Path(sys.executable).parent / "dagster"), ["dagster", "dev", "-w", str(PROJECT_ROOT / "workspace.yaml")])
    return 0


def main(argv: list[str] | None = None) -> int:
    use_dagster_client_env()  # before anything imports dagster
    _setup_logging()
    parser = argparse.ArgumentParser(prog="kairos", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="materialize everything on embedded defaults, deploy, serve, print ranked lists")
    d.add_argument("--config", default="", help="a world file (YAML): source, mapping, catalog, users, split, "
                   "labels, gate, serving, ops (see orchestration/world.py); options below override its source")
    d.add_argument("--source", default="", choices=["", *SOURCES], help="default simulator")
    d.add_argument("--path", default="", help="--source file: a CSV/TSV/Parquet log; movielens-*: the folder")
    d.add_argument("--mapping", default="", help='--source file: column mapping JSON, e.g. '
                   '\'{"user": "uid", "item": "sku", "timestamp": "ts", "timestamp_unit": "s"}\'')
    d.add_argument("--delimiter", default="", help="--source file: field delimiter (default: sniffed from the header)")
    d.add_argument("--encoding", default="", help="--source file: text encoding (default utf-8), e.g. latin-1")
    d.add_argument("--catalog", default="", help="--source file: item catalog file (ids, categories, title, ...)")
    d.add_argument("--catalog-mapping", default="", help='its columns as JSON, e.g. \'{"item": "movieId", '
                   '"title": "title", "categories": "genres"}\' (default {"item": "item_id"})')
    d.add_argument("--users-file", default="", help="--source file: user profile file")
    d.add_argument("--users-mapping", default="", help='its columns as JSON, e.g. \'{"user": "id", "segment": "plan"}\'')
    d.add_argument("--users", type=int, default=None, help="simulator users (300)")
    d.add_argument("--items", type=int, default=None, help="simulator items (400)")
    d.add_argument("--days", type=int, default=None, help="simulator days (14)")
    d.add_argument("--seed", type=int, default=None, help="simulator seed (7)")
    d.add_argument("--port", type=int, default=0)
    d.set_defaults(fn=demo)
    r = sub.add_parser("redis", help="run the embedded redis-server")
    r.add_argument("--port", type=int, default=0)
    r.set_defaults(fn=cmd_redis)
    s = sub.add_parser("serve", help="run the BentoML ranking server")
    s.add_argument("--port", type=int, default=0)
    s.set_defaults(fn=cmd_serve)
    from streaming.options import add_arguments as add_stream_arguments

    st = sub.add_parser("stream", help="run the streaming job (Redis Stream -> session keys + bronze micro-batches)")
    add_stream_arguments(st).set_defaults(fn=cmd_stream)
    sub.add_parser("ui", help="run the Dagster UI").set_defaults(fn=cmd_ui)
    ln = sub.add_parser("lineage", help="lineage of a model version or of a served request")
    ln.add_argument("--version", default="", help="registered model version")
    ln.add_argument("--request-id", default="", help="a served request id (impression log or Redis stream)")
    ln.add_argument("--json", action="store_true", help="print the whole lineage document as JSON")
    ln.add_argument("--html", default="", help="also write the HTML report to this path")
    ln.set_defaults(fn=cmd_lineage)
    fg = sub.add_parser("forget", help="right to be forgotten: delete a user everywhere, exclude, audit")
    fg.add_argument("--user", required=True)
    fg.add_argument("--by", required=True, help="who requested / executed it (goes to the audit log)")
    fg.add_argument("--reason", required=True, help="why (e.g. the ticket of the data-subject request)")
    fg.add_argument("--retention-hours", type=float, default=0.0,
                    help="0 (default): purge old table versions now; H: keep H hours of time travel")
    fg.set_defaults(fn=cmd_forget)
    args = parser.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
