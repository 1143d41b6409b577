"""The scale path on real engines, all on loopback and all pip-installed: the whole asset graph and a forget
with Spark on a standalone master + worker (its own working directory, no PYTHONPATH: the code reaches the
executors only as the shipped zip), the lake on S3 (moto's server, written by delta-rs and read by Spark through
the kairos_delta source) and the registry on an `mlflow server` (artifacts in the server's root)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from compliance.exclusion import FORGOTTEN_USERS, PRIVACY_AUDIT, user_hash
from lake.delta import DeltaLake
from ground.settings import privacy_key

pytestmark = pytest.mark.e2e

SOURCE = {"source": "simulator", "n_users": 60, "n_items": 80, "days": 8, "seed": 3}  # the compliance world


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, redis_server):
    from lake.spark import stop_session
    from orchestration.cli import materialize_all, prepare_home
    from orchestration.services import start_mlflow_server, start_spark_standalone
    from ground.settings import Settings
    from tests._engines import moto_endpoint, new_bucket, s3_env
    from tests._env import kairos_env

    engines = tmp_path_factory.mktemp("engines")
    home = tmp_path_factory.mktemp("kairos-cluster") / "kairos"
    endpoint = moto_endpoint(engines)
    master, worker = start_spark_standalone(engines / "spark", cores=1, memory="1g")
    mlflow_server = start_mlflow_server(engines / "mlflow")
    lake_uri = f"s3://{new_bucket(endpoint)}/lake"
    env = {**s3_env(endpoint), "KAIROS_LAKE_URI": lake_uri, "KAIROS_SPARK_MASTER": master.url,
           "MLFLOW_TRACKING_URI": mlflow_server.url, "DAGSTER_HOME": str(home / "dagster"),
           "KAIROS_SPARK_DRIVER_MEMORY": "1g", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "KAIROS_SPARK_CONF": json.dumps({"spark.executor.memory": "768m", "spark.cores.max": "1"})}
    stop_session()  # a local session of an earlier test module must not be reused
    try:
        with kairos_env(home, redis_server.url, **env):
            import redis

            redis.Redis.from_url(redis_server.url).flushdb()
            settings = Settings.from_env()
            prepare_home(settings)
            run = materialize_all(settings, SOURCE)
            yield {"settings": settings, "run": run, "master": master, "worker": worker, "mlflow": mlflow_server,
                   "engines": engines, "redis": redis_server}
    finally:
        stop_session()
        for service in (worker, master, mlflow_server):
            service.stop()


def test_whole_graph_on_the_cluster_configuration(cluster) -> None:
    settings = cluster["settings"]
    assert cluster["run"]["success"]
    lake = DeltaLake(settings.lake_uri)
    tables = lake.tables()  # listed on the object store
    for table in ("bronze_events", "silver_events", "labels", "user_features", "item_features", "training_set"):
        assert table in tables, table
    assert not (settings.home / "lake").exists()  # nothing of the lake on the driver's disk
    assert lake.pin("training_set").rows > 100
    # the executors ran the shipped zip, from the worker's own folder
    from lake.spark import executor_environment, spark_session

    spark = spark_session(settings.spark_master, lake_uri=settings.lake_uri)
    assert spark.sparkContext.master == cluster["master"].url
    for probe in executor_environment(spark):
        assert ".zip/lake/spark.py" in probe["kairos_code"], probe
        assert Path(probe["cwd"]).is_relative_to(cluster["engines"] / "spark" / "worker"), probe


def test_registry_artifacts_live_on_the_server(cluster) -> None:
    settings = cluster["settings"]
    from models.registry import mlflow_client

    from models.registry import load_alias

    client = mlflow_client(settings)
    # the newest version (always `challenger`; on a world this small the gate may keep it from `champion`)
    mv = client.get_model_version_by_alias(settings.model_name, "challenger")
    assert client.get_run(mv.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    served = cluster["engines"] / "mlflow" / "artifacts"
    assert list(served.rglob("manifest.json")), "the bundle is in the server's artifact root"
    assert not (settings.home / "mlartifacts").exists()  # never on the client's disk
    bundle = load_alias(settings, "challenger")  # downloaded through the server
    assert bundle is not None and bundle.model_version == str(mv.version)


def test_forget_on_the_object_store_lake(cluster) -> None:
    from orchestration.cli import main

    settings = cluster["settings"]
    lake = DeltaLake(settings.lake_uri)
    silver = lake.read("silver_events", columns=["user_id"])
    uid = str(silver["user_id"].value_counts().index[0])
    with_user = [t for t in lake.tables() if "user_id" in [f.name for f in lake._table(t).schema().fields]
                 and t not in (FORGOTTEN_USERS, PRIVACY_AUDIT)]
    assert {"bronze_events", "silver_events", "labels", "training_set"} <= set(with_user)
    assert main(["forget", "--user", uid, "--by", "dpo@example.com", "--reason", "cluster test"]) == 0
    for table in with_user:
        assert not (lake.read(table, columns=["user_id"])["user_id"] == uid).any(), table
    audit = lake.read(PRIVACY_AUDIT)
    row = audit[audit["user_hash"] == user_hash(privacy_key(settings), uid)].iloc[-1]
    deleted = json.loads(row["deleted"])
    assert deleted["delta.silver_events"] > 0 and "status" not in json.loads(row["pending"])


def test_forget_fails_cleanly(cluster) -> None:
    """Unreachable Redis: refused before any write. Redis refusing a command mid-way: the audit row says
    `incomplete` with the step and the error, and re-running the request completes it."""
    import redis

    from compliance.forget import ForgetIncomplete, forget_user
    from orchestration.services import free_port

    settings = cluster["settings"]
    lake = DeltaLake(settings.lake_uri)
    uid = str(lake.read("silver_events", columns=["user_id"])["user_id"].value_counts().index[1])
    versions = {t: lake.version(t) for t in (FORGOTTEN_USERS, PRIVACY_AUDIT)}
    dead = redis.Redis(port=free_port(), socket_connect_timeout=1)
    with pytest.raises(redis.ConnectionError):
        forget_user(settings, uid, "dpo@example.com", "redis down", redis_client=dead)
    assert {t: lake.version(t) for t in versions} == versions  # nothing written
    admin = redis.Redis.from_url(cluster["redis"].url)
    admin.execute_command("ACL", "SETUSER", "limited", "on", ">limited-pw", "~*", "+ping", "+zrange", "+get")
    try:
        limited = redis.Redis.from_url(cluster["redis"].url, username="limited", password="limited-pw")
        with pytest.raises(ForgetIncomplete, match="redis step"):
            forget_user(settings, uid, "dpo@example.com", "acl too narrow", redis_client=limited)
    finally:
        admin.execute_command("ACL", "DELUSER", "limited")
    audit = lake.read(PRIVACY_AUDIT)
    mine = audit[audit["user_hash"] == user_hash(privacy_key(settings), uid)]
    pending = json.loads(mine.iloc[-1]["pending"])
    assert pending["status"] == "incomplete" and pending["failed_step"] == "redis" and "NoPermission" in pending["error"]
    assert (lake.read("silver_events", columns=["user_id"])["user_id"] == uid).any()  # the lake was not touched yet
    done = forget_user(settings, uid, "dpo@example.com", "acl too narrow (re-run)")
    assert "status" not in json.loads(done["pending"]) and json.loads(done["deleted"])["delta.silver_events"] > 0
    assert not (lake.read("silver_events", columns=["user_id"])["user_id"] == uid).any()
