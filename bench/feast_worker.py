"""The Feast side of bench/feature_store.py, run in its own interpreter (Feast 0.67 pins older
prometheus_client / tenacity than Kairos, so it lives in a separate environment: see that bench's docstring).

Speaks JSON lines on stdin/stdout with the bench, which interleaves its rounds with Kairos on the same
redis-server:
    {"cmd": "setup", "redis": "127.0.0.1:PORT", "repo": DIR}            -> {"ok": true}
    {"cmd": "write", "view": "users"|"items", "parquet": PATH}          -> {"rows", "seconds", "used_memory_delta"}
    {"cmd": "round", "requests": [{"user": U, "session": S, "items": [...]}, ...]}
                                                                       -> {"ms": [...], "checks": [...]}
    {"cmd": "first_answer", "request": {...}}   (in a fresh process)   -> {"ms_in_process": x}
It uses only Feast's public API (FeatureStore.apply / write_to_online_store / get_online_features).
"""
from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import pandas as pd

USER_FEATURES = ["user_clicks_7d", "user_impressions_30d", "user_ctr_30d", "user_category_clicks_30d",
                 "user_avg_session_length_7d", "user_category_decayed_30d", "signup_ts"]
ITEM_FEATURES = ["item_clicks_7d", "item_impressions_7d", "item_ctr_7d", "category", "publish_ts", "co_items_30d"]
STRINGS = {"user_category_clicks_30d", "user_category_decayed_30d", "category", "co_items_30d"}
INTS = {"signup_ts", "publish_ts"}


def _store(redis_addr: str, repo: Path):
    """A FeatureStore on an existing registry (what a serving process opens)."""
    from feast import FeatureStore, RepoConfig
    from feast.infra.online_stores.redis import RedisOnlineStoreConfig
    from feast.repo_config import RegistryConfig

    repo.mkdir(parents=True, exist_ok=True)
    config = RepoConfig(project="kairos_bench", provider="local",
                        registry=RegistryConfig(path=str(repo / "registry.db"), cache_ttl_seconds=3600),
                        online_store=RedisOnlineStoreConfig(connection_string=redis_addr),
                        entity_key_serialization_version=3)
    return FeatureStore(config=config)


def _repo(redis_addr: str, repo: Path):
    """Register the two feature views (the same store columns Kairos serves) and return the store."""
    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64, Int64, String

    store = _store(redis_addr, repo)
    dummy = repo / "empty.parquet"  # the offline source Feast insists on; rows go straight to the online store
    cols = {"user_id": pd.Series([], dtype="string"), "item_id": pd.Series([], dtype="string"),
            **{n: pd.Series([], dtype="string" if n in STRINGS else "int64" if n in INTS else float)
               for n in USER_FEATURES + ITEM_FEATURES},
            "feature_ts": pd.Series([], dtype="datetime64[ns, UTC]")}
    pd.DataFrame(cols).to_parquet(dummy)
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING)
    item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING)

    def fields(names: list[str]) -> list:
        return [Field(name=n, dtype=String if n in STRINGS else Int64 if n in INTS else Float64) for n in names]

    users = FeatureView(name="users", entities=[user], ttl=timedelta(days=7), schema=fields(USER_FEATURES),
                        online=True, source=FileSource(path=str(dummy), timestamp_field="feature_ts"))
    items = FeatureView(name="items", entities=[item], ttl=timedelta(days=7), schema=fields(ITEM_FEATURES),
                        online=True, source=FileSource(path=str(dummy), timestamp_field="feature_ts"))
    store.apply([user, item, users, items])
    return store


def _used_memory(redis_addr: str) -> int:
    import redis

    host, port = redis_addr.split(":")
    return int(redis.Redis(host=host, port=int(port)).info("memory")["used_memory"])


def _answer(store, req: dict, session_client) -> tuple[float, float, list]:
    c0, t0 = time.process_time(), time.perf_counter()
    user = store.get_online_features(features=[f"users:{f}" for f in USER_FEATURES],
                                     entity_rows=[{"user_id": req["user"]}]).to_dict()
    session_client.get(f"kairos:session:{req['session']}")
    items = store.get_online_features(features=[f"items:{f}" for f in ITEM_FEATURES],
                                      entity_rows=[{"item_id": i} for i in req["items"]]).to_dict()
    ms, cpu = (time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000
    # what the bench cross-checks against Kairos: the user's clicks and the first candidates' clicks
    return ms, cpu, [user["user_clicks_7d"][0], items["item_clicks_7d"][:3]]


def main() -> None:
    import redis

    store = session_client = addr = None
    for line in sys.stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "setup":
            addr = msg["redis"]
            store = _repo(addr, Path(msg["repo"]))
            host, port = addr.split(":")
            session_client = redis.Redis(host=host, port=int(port))
            out = {"ok": True}
        elif cmd == "write":
            frame = pd.read_parquet(msg["parquet"])
            for col in frame.columns:
                if col in INTS:
                    frame[col] = frame[col].astype("Int64")
            frame["feature_ts"] = pd.Timestamp.now(tz="UTC")
            before = _used_memory(addr)
            t0 = time.perf_counter()
            store.write_to_online_store(msg["view"], frame)
            seconds = time.perf_counter() - t0
            out = {"rows": len(frame), "seconds": seconds, "used_memory_delta": _used_memory(addr) - before}
        elif cmd == "round":
            ms, cpu_ms, checks = [], [], []
            for req in msg["requests"]:
                t, cpu, check = _answer(store, req, session_client)
                ms.append(t)
                cpu_ms.append(cpu)
                checks.append(check)
            out = {"ms": ms, "cpu_ms": cpu_ms, "checks": checks}
        elif cmd == "first_answer":
            t0 = time.perf_counter()
            addr = msg["redis"]
            host, port = addr.split(":")
            store = _store(addr, Path(msg["repo"]))  # imports feast: part of the first answer
            _answer(store, msg["request"], redis.Redis(host=host, port=int(port)))
            out = {"ms_in_process": (time.perf_counter() - t0) * 1000}
        elif cmd == "quit":
            break
        else:
            out = {"error": f"unknown command {cmd}"}
        sys.stdout.write(json.dumps(out, default=float) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
