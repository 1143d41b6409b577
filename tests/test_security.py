"""Security: Redis password and TLS come from the environment; model bundles load only from the registry,
and a tampered bundle is refused."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import redis

from features.online import OnlineStore
from models.bundle import MANIFEST, RANKER, Bundle, BundleIntegrityError, file_sha256
from models.registry import MANIFEST_SHA_TAG, _find_bundle_dir, load_alias, mlflow_client
from assets.resources import RedisResource
from orchestration.services import start_redis
from ground.settings import Settings, redact_url, redis_client, redis_connection_kwargs
from training.gates import GateResult
from training.registry import register_bundle

PASSWORD = "s3cret-for-tests"


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory):
    """A real redis-server started with requirepass."""
    server = start_redis(tmp_path_factory.mktemp("redis-auth"), password=PASSWORD)
    yield server
    server.stop()


def test_redis_password_comes_from_the_environment(locked_redis, monkeypatch) -> None:
    assert PASSWORD not in locked_redis.url  # never in the URL (nor in redis.url files or logs)
    monkeypatch.delenv("REDIS_PASSWORD", raising=False)
    with pytest.raises(redis.AuthenticationError):
        redis_client(locked_redis.url).ping()
    monkeypatch.setenv("REDIS_PASSWORD", "wrong")
    with pytest.raises(redis.AuthenticationError):
        redis_client(locked_redis.url).ping()
    monkeypatch.setenv("REDIS_PASSWORD", PASSWORD)
    assert redis_client(locked_redis.url).ping()
    # every place that builds a client goes through redis_client: the Dagster resource and the online store
    resource_client = RedisResource(url=locked_redis.url).client()
    resource_client.set("kairos:fs:current", "v1")
    store = OnlineStore.from_url(locked_redis.url, timeout_s=1.0)
    assert store.current_version() == "v1"
    # the binary client (packed item rows) inherits the credentials
    assert store._binary().get("kairos:fs:current") == b"v1"


def test_redis_tls_options_from_the_environment(monkeypatch) -> None:
    for k in ("REDIS_PASSWORD", "REDIS_USERNAME", "KAIROS_REDIS_TLS", "KAIROS_REDIS_TLS_CA", "KAIROS_REDIS_TLS_CERT",
              "KAIROS_REDIS_TLS_KEY", "KAIROS_REDIS_TLS_VERIFY"):
        monkeypatch.delenv(k, raising=False)
    url, kwargs = redis_connection_kwargs("redis://cache.internal:6379/0")
    assert url == "redis://cache.internal:6379/0" and kwargs == {}
    monkeypatch.setenv("KAIROS_REDIS_TLS", "1")
    monkeypatch.setenv("KAIROS_REDIS_TLS_CA", "/etc/ssl/redis-ca.pem")
    monkeypatch.setenv("REDIS_USERNAME", "kairos")
    monkeypatch.setenv("REDIS_PASSWORD", "pw")
    url, kwargs = redis_connection_kwargs("redis://cache.internal:6379/0")
    assert url.startswith("rediss://")
    assert kwargs == {"password": "pw", "username": "kairos", "ssl_ca_certs": "/etc/ssl/redis-ca.pem",
                      "ssl_cert_reqs": "required"}
    client = redis_client("redis://cache.internal:6379/0")  # no connection is made until a command
    assert client.connection_pool.connection_class is redis.SSLConnection
    assert client.connection_pool.connection_kwargs["ssl_ca_certs"] == "/etc/ssl/redis-ca.pem"
    # a password in the URL wins over the environment, and is redacted for printing
    _, kwargs = redis_connection_kwargs("rediss://:inurl@cache.internal:6380/0")
    assert "password" not in kwargs
    assert redact_url("rediss://:inurl@cache.internal:6380/0") == "rediss://:***@cache.internal:6380/0"


def test_no_hard_coded_secrets_in_the_code() -> None:
    """Secrets come from the environment only: no password/token/api-key literals assigned in the product code."""
    import re

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"""(password|passwd|secret|api_key|token)\s*[:=]\s*["'][^"'\s]{4,}["']""", re.I)
    offenders = []
    for path in root.glob("*/*.py"):
        if path.parts[-2] in (".venv", "tests", "kairos.egg-info"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not offenders, offenders


def _tiny_bundle() -> Bundle:
    """A real (untrained) bundle: towers, embeddings, FAISS index, LightGBM ranker; seeded, built in ~1 s."""
    import faiss
    import lightgbm as lgb
    import torch

    from features.registry import ranker_feature_names
    from models.two_tower import TwoTower

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    towers = TwoTower(n_users=3, n_items=6, n_categories=2, dim=8).eval()
    emb = rng.normal(size=(6, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(8)
    index.add(emb)
    names = ranker_feature_names()
    x = rng.normal(size=(60, len(names)))
    data = lgb.Dataset(x, label=(x[:, 0] > 0).astype(int), feature_name=names)
    ranker = lgb.train({"objective": "binary", "verbose": -1, "num_threads": 1, "seed": 0}, data, num_boost_round=3)
    return Bundle(towers=towers, item_ids=[f"i{k}" for k in range(6)], user_ids=["u0", "u1", "u2"],
                  item_embeddings=emb, index=index, ranker=ranker,
                  popularity={"global": [f"i{k}" for k in range(6)]})


def test_bundle_files_are_hashed_and_tampering_is_refused(tmp_path) -> None:
    path = _tiny_bundle().save(tmp_path / "bundle")
    manifest = json.loads((path / MANIFEST).read_text())
    assert set(manifest["files_sha256"]) == {p.name for p in path.iterdir() if p.name != MANIFEST}
    # outside the registry cache: refused unless explicitly allowed
    with pytest.raises(BundleIntegrityError, match="registry"):
        Bundle.load(path)
    ok = Bundle.load(path, allow_untrusted_path=True)
    assert ok.item_ids == [f"i{k}" for k in range(6)]
    # one changed byte in the ranker -> refused, with the file named
    ranker = path / RANKER
    ranker.write_text(ranker.read_text().replace("num_leaves", "num_leaveZ", 1))
    with pytest.raises(BundleIntegrityError, match="ranker.txt"):
        Bundle.load(path, allow_untrusted_path=True)
    # an extra file dropped next to the bundle (e.g. a pickle) -> refused
    path2 = _tiny_bundle().save(tmp_path / "bundle2")
    (path2 / "evil.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(BundleIntegrityError, match="evil.pkl"):
        Bundle.load(path2, allow_untrusted_path=True)


def test_served_bundles_come_from_the_registry_and_are_verified(settings, tmp_path) -> None:
    bundle_dir = _tiny_bundle().save(tmp_path / "bundle")
    gate = GateResult(True, ["PASS beats_popularity"], {"beats_popularity": {"passed": True}})
    version = register_bundle(settings, bundle_dir, {"two_stage": {"auc": 0.6}}, {"rows": 60},
                              {"dagster.run_id": "test-run", "git.sha": "abc"}, gate)
    mv = mlflow_client(settings).get_model_version(settings.model_name, version)
    assert mv.tags[MANIFEST_SHA_TAG] == file_sha256(bundle_dir / MANIFEST)
    assert mv.tags["promoted.champion.by"] == "dagster run test-run" and int(mv.tags["promoted.champion.at"]) > 0
    loaded = load_alias(settings, "champion")
    assert loaded.model_version == version
    cached = _find_bundle_dir(Path(settings.home) / "model_cache")
    # a copy of the registered bundle anywhere else is refused by the default (serving) load
    elsewhere = tmp_path / "copy"
    shutil.copytree(cached, elsewhere)
    with pytest.raises(BundleIntegrityError, match="registry"):
        Bundle.load(elsewhere)
    # tamper with the cached copy, re-signing the manifest: the registry's manifest hash catches it
    emb = np.load(cached / "item_embeddings.npy")
    np.save(cached / "item_embeddings.npy", emb * 0)
    manifest = json.loads((cached / MANIFEST).read_text())
    manifest["files_sha256"]["item_embeddings.npy"] = file_sha256(cached / "item_embeddings.npy")
    (cached / MANIFEST).write_text(json.dumps(manifest))
    # ... the registry's manifest hash catches it, and the corrupt cache heals: deleted, downloaded again, verified
    healed = load_alias(settings, "champion")
    assert np.array_equal(healed.item_embeddings, loaded.item_embeddings) and np.abs(healed.item_embeddings).sum() > 0
    assert file_sha256(_find_bundle_dir(Path(settings.home) / "model_cache") / MANIFEST) == mv.tags[MANIFEST_SHA_TAG]
    # the registry's own copy tampered the same way: nothing trustworthy to heal from, refused
    stored = [p for p in Path(settings.home).rglob("item_embeddings.npy") if "model_cache" not in p.parts]
    assert stored
    for path in stored:
        np.save(path, np.load(path) * 0)
        signed = json.loads((path.parent / MANIFEST).read_text())
        signed["files_sha256"]["item_embeddings.npy"] = file_sha256(path)
        (path.parent / MANIFEST).write_text(json.dumps(signed))
    shutil.rmtree(Path(settings.home) / "model_cache")
    with pytest.raises(BundleIntegrityError, match="differs from the one registered"):
        load_alias(settings, "champion")


def test_embedded_redis_uses_the_password_from_the_environment(settings, monkeypatch) -> None:
    """`kairos demo`/`kairos redis` start the embedded server with requirepass when REDIS_PASSWORD is set."""
    from orchestration.cli import ensure_redis

    monkeypatch.delenv("REDIS_URL", raising=False)  # restored (removed) after the test
    monkeypatch.setenv("REDIS_PASSWORD", PASSWORD)
    server = ensure_redis(Settings.from_env())
    try:
        assert PASSWORD not in (settings.home / "redis.url").read_text()
        assert redis_client(server.url).ping()
        monkeypatch.delenv("REDIS_PASSWORD")
        with pytest.raises(redis.AuthenticationError):
            redis_client(server.url).ping()
    finally:
        server.stop()
