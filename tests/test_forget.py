"""Right to be forgotten: after `kairos forget`, the user is gone from Redis, from every Delta table (current
version, old versions and the files behind them), from a re-ingest of the same source and from the next
training set, and the privacy audit log says who asked, why and what was deleted."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import AssetKey, DagsterInstance

from compliance.exclusion import FORGOTTEN_USERS, PRIVACY_AUDIT, forgotten_mask, user_hash
from compliance.forget import delete_predicate, entry_mentions_user, glob_escape, names_user
from lake.delta import DeltaLake
from ground.settings import privacy_key, redis_client
from tests._compliance_world import SOURCE, compliance_world, world_env

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def forgotten():
    world = compliance_world()
    with world_env(world):
        from orchestration.cli import main

        settings = world["settings"]
        uid = world["forgotten"]
        lake = DeltaLake(settings.lake_uri)
        before = {t: int((lake.read(t, columns=["user_id"])["user_id"] == uid).sum()) for t in lake.tables()
                  if "user_id" in [f.name for f in lake._table(t).schema().fields]}
        client = redis_client(world["redis"].url)
        keys_before = [k for k in client.scan_iter(count=1000) if names_user(k, uid)]
        assert main(["forget", "--user", uid, "--by", "dpo@example.com", "--reason", "ticket DSR-42"]) == 0
        yield world, before, keys_before


def _redis_dump(client) -> dict[str, str]:
    """Every key and its whole content as text (strings, hashes, sets, zsets, lists, streams); the online
    store's packed item rows are binary, so hashes are read as bytes and shown with undecodable bytes replaced
    (item ids inside them are utf-8 and still findable)."""
    raw = client.connection_pool.connection_kwargs.get("decode_responses") and type(client)(
        connection_pool=type(client.connection_pool)(**{**client.connection_pool.connection_kwargs,
                                                        "decode_responses": False}))
    out = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == "string":
            value = client.get(key)
        elif kind == "hash":
            fields = (raw or client).hgetall(key)
            value = json.dumps({(k.decode(errors="replace") if isinstance(k, bytes) else k):
                                (v.decode(errors="replace") if isinstance(v, bytes) else v) for k, v in fields.items()})
        elif kind == "set":
            value = json.dumps(sorted(client.smembers(key)))
        elif kind == "zset":
            value = json.dumps(client.zrange(key, 0, -1))
        elif kind == "list":
            value = json.dumps(client.lrange(key, 0, -1))
        elif kind == "stream":
            value = json.dumps(client.xrange(key))
        else:
            value = ""
        out[key] = value
    return out


def test_pure_helpers() -> None:
    assert names_user("kairos:user_recent_cats:u00001", "u00001")
    assert not names_user("kairos:user_recent_cats:u000010", "u00001")
    assert glob_escape("u[1]*?") == "u\\[1\\]\\*\\?"
    assert "u00001" not in delete_predicate("u00001") and delete_predicate("u00001").startswith("encode(sha256(user_id)")
    assert entry_mentions_user({"record": json.dumps({"user_id": "u7", "items": []})}, "u7")
    assert not entry_mentions_user({"record": json.dumps({"user_id": "u70"})}, "u7")
    import pandas as pd

    key = b"k"
    mask = forgotten_mask(pd.Series(["a", "b", None, "a"]), frozenset({user_hash(key, "a")}), key)
    assert mask.tolist() == [True, False, False, True]


def test_user_gone_from_redis(forgotten) -> None:
    world, _, keys_before = forgotten
    uid = world["forgotten"]
    assert keys_before, "the world should hold keys of the user before the request"
    client = redis_client(world["redis"].url)
    dump = _redis_dump(client)
    leaks = {k: v[:200] for k, v in dump.items() if uid in k or uid in v}
    assert not leaks, leaks
    # the other user's online row, session and stream entries are untouched
    other = world["other"]
    assert any(names_user(k, other) for k in dump)
    assert client.exists("kairos:session:live-session-" + other)
    assert any(other in v for k, v in dump.items() if k == "kairos:impressions")


def test_user_gone_from_every_delta_table_and_its_history(forgotten) -> None:
    world, before, _ = forgotten
    uid, settings = world["forgotten"], world["settings"]
    lake = DeltaLake(settings.lake_uri)
    assert before["silver_events"] > 0 and before["bronze_events"] > 0 and before["training_set"] > 0
    assert before["impression_log"] > 0 and before["user_features"] > 0 and before["catalog_users"] == 1
    for table in before:
        now = lake.read(table, columns=["user_id"])
        assert not (now["user_id"] == uid).any(), table
        # every parquet file left on disk, referenced or not: old versions' files were vacuumed
        for f in Path(lake.uri(table)).rglob("*.parquet"):
            if "_delta_log" in f.parts:
                continue
            col = pq.read_table(f, columns=["user_id"]).column("user_id").to_pylist()
            assert uid not in col, (table, f)
        # nor does the log name the user (hashed delete predicate; pre-purge history expired)
        for f in (Path(lake.uri(table)) / "_delta_log").iterdir():
            assert uid.encode() not in f.read_bytes(), (table, f.name)
        # time travel to the first version cannot bring the rows back
        try:
            old = lake.read(table, version=0, columns=["user_id"])
        except Exception:  # noqa: BLE001 - version 0 is gone with its log and files: that is the point
            continue
        assert not (old["user_id"] == uid).any(), table


def test_audit_entry_records_who_why_and_what(forgotten) -> None:
    world, before, _ = forgotten
    settings, uid = world["settings"], world["forgotten"]
    from compliance.forget import was_forgotten

    entries = was_forgotten(settings, uid)
    assert len(entries) == 1
    entry = entries[0]
    assert entry["requested_by"] == "dpo@example.com" and entry["reason"] == "ticket DSR-42"
    assert entry["user_hash"] == user_hash(privacy_key(settings), uid) and entry["purged_by_ms"] == entry["completed_at_ms"]
    deleted = json.loads(entry["deleted"])
    for table, n in before.items():
        assert deleted[f"delta.{table}"] == n, table
    assert deleted["redis_user_keys"] >= 2 and deleted["redis_session_keys"] >= 1
    assert deleted["redis_stream_entries"] >= 3 + 1  # three live events + the impression still in the stream
    assert entry["total_deleted"] == sum(deleted.values())
    # what still holds the user is named, with the action that clears it: bundles trained before the request
    pending = json.loads(entry["pending"])
    assert pending["model_bundles"] and "retrain" in pending["action"]
    for folder in pending["model_bundles"]:
        assert uid in json.loads((settings.home / folder / "user_vocab.json").read_text())
    # any other file under KAIROS_HOME still spelling the id is listed (and truly does); never a lake file
    for f in pending.get("other_files", []):
        assert not f.startswith("lake/") and uid.encode() in (settings.home / f).read_bytes(), f
    lake = DeltaLake(settings.lake_uri)
    for table in (PRIVACY_AUDIT, FORGOTTEN_USERS):  # the compliance tables never hold the raw id
        assert uid not in lake.read(table).to_json()


def test_reingest_and_next_training_set_exclude_the_user(forgotten) -> None:
    world, _, _ = forgotten
    uid, other, settings = world["forgotten"], world["other"], world["settings"]
    with world_env(world):
        from orchestration.definitions import defs

        days = (world["run"]["days"],)
        from assets.ingestion import SourceConfig, source_partitions

        parts = source_partitions(SourceConfig(**SOURCE))
        instance = DagsterInstance.get()
        # the same source again: the user's events are in it, and must not come back
        ingest = defs.resolve_job_def("ingest_events").execute_in_process(
            instance=instance, run_config={"ops": {"bronze_events": {"config": SOURCE}}}, raise_on_error=True,
            tags={"dagster/asset_partition_range_start": parts[0], "dagster/asset_partition_range_end": parts[-1]})
        rebuilt = defs.resolve_job_def("build").execute_in_process(
            instance=instance, run_config={"ops": {"catalog": {"config": SOURCE}}}, raise_on_error=True,
            asset_selection=[AssetKey(k) for k in ("catalog_items", "catalog_users", "labels", "user_features",
                                                   "item_features", "training_set")])
        assert ingest.success and rebuilt.success and days
        bronze_meta = instance.get_latest_materialization_event(AssetKey("bronze_events")).asset_materialization.metadata
        assert bronze_meta["forgotten_user_events_excluded"].value > 0
        lake = DeltaLake(settings.lake_uri)
        for table in ("bronze_events", "silver_events", "catalog_users", "labels", "user_features", "training_set"):
            users = set(lake.read(table, columns=["user_id"])["user_id"].dropna())
            assert uid not in users, table
            assert other in users, table  # everyone else is still there
