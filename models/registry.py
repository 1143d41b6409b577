"""The registry's read path: resolve an alias, download its bundle once per version, verify and load it.

Serving loads models only through here (and models.rollout for the rollout state), so it never imports
training code; training/registry.py keeps registration (runs, versions, promotion tags) and builds its
MLflow client with the same `mlflow_client`. A rollback is an alias flip: serving resolves
`models:/<name>@champion`, downloads the bundle into KAIROS_HOME/model_cache and loads it (Bundle.load).

`settings` is anything with `home`, `mlflow_tracking_uri` and `model_name` (ground.settings.Settings
in the product): this package does not import the orchestration layer.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Protocol

from models.bundle import CACHE_DIR, MANIFEST, Bundle, BundleIntegrityError

log = logging.getLogger("kairos.registry")

CHAMPION = "champion"
CHALLENGER = "challenger"
# model-version tag: sha256 of the bundle's manifest, so a cached copy cannot be re-signed by rewriting it
MANIFEST_SHA_TAG = "bundle.manifest_sha256"


class RegistrySettings(Protocol):
    """What the registry read path needs from the settings (read-only, so the frozen ground.settings.Settings
    is one)."""

    @property
    def home(self) -> Path: ...

    @property
    def mlflow_tracking_uri(self) -> str: ...

    @property
    def model_name(self) -> str: ...


def mlflow_client(settings: RegistrySettings) -> Any:
    """The one MLflow client builder: tracking and registry both on settings.mlflow_tracking_uri, given
    explicitly (MLflow's process-wide registry URI outlives a Settings, so a client that relies on it can
    reach the server of an earlier configuration). Also points the fluent API (mlflow.log_*) there."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    uri = settings.mlflow_tracking_uri
    with _sqlite_store_init_lock(uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        if uri.startswith("sqlite:///") and uri not in _INITIALIZED_STORES:
            client.search_experiments(max_results=1)       # the tracking store: tables created / migrated
            client.search_registered_models(max_results=1)  # the registry store (same database)
            _INITIALIZED_STORES.add(uri)
    return client


_INITIALIZED_STORES: set[str] = set()


@contextlib.contextmanager
def _sqlite_store_init_lock(uri: str) -> Iterator[None]:
    """An exclusive file lock while a process first opens a sqlite tracking store (other stores: no lock).

    Why: MLflow creates and migrates a sqlite database when a process first opens it (in MlflowClient's
    constructor), without any lock; the server's worker processes (one per core) starting on a fresh home
    raced each other through the migration ("table _alembic_tmp_metrics already exists") and left the
    database unusable."""
    import fcntl

    if not uri.startswith("sqlite:///") or uri in _INITIALIZED_STORES:
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".init.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def alias_model_version(settings: RegistrySettings, alias: str) -> Any:
    """The MLflow ModelVersion behind `models:/<name>@<alias>`, or None when the alias is not set."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client(settings)
    try:
        return client.get_model_version_by_alias(settings.model_name, alias)
    except MlflowException:
        return None


def alias_version(settings: RegistrySettings, alias: str) -> str | None:
    """The version number the alias points at (one registry read; the server polls it to notice a flip)."""
    mv = alias_model_version(settings, alias)
    return str(mv.version) if mv is not None else None


def _find_bundle_dir(root: Path) -> Path:
    hits = sorted(root.rglob(MANIFEST), key=lambda p: len(p.parts))
    for p in hits:
        if p.parent.name != "manifest":
            return p.parent
    raise FileNotFoundError(f"no {MANIFEST} under {root}")


def _download(settings: RegistrySettings, version: str, cache: Path) -> None:
    """Download version `version` into `cache` once (atomically: a temp dir renamed when complete)."""
    import mlflow

    if (cache / ".complete").exists():
        return
    if cache.exists():  # a partial download from a crashed process
        shutil.rmtree(cache, ignore_errors=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=cache.parent))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{settings.model_name}/{version}",
                                            dst_path=str(tmp), tracking_uri=settings.mlflow_tracking_uri)
        (tmp / ".complete").write_text(version)
        try:
            tmp.rename(cache)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_alias(settings: RegistrySettings, alias: str = CHAMPION) -> Bundle | None:
    """Download (once per version) and load the bundle behind `models:/<name>@<alias>`; None if absent.

    A cached copy that fails verification (a corrupt or tampered file, a bad disk) is not refused forever: it
    is deleted and downloaded again from the registry, once, and verified again against the registry's manifest
    hash; only a registry copy that fails too raises BundleIntegrityError."""
    mv = alias_model_version(settings, alias)
    if mv is None:
        return None
    version = str(mv.version)
    cache = Path(settings.home) / CACHE_DIR / settings.model_name / version
    for attempt in (1, 2):
        _download(settings, version, cache)
        try:
            return Bundle.load(_find_bundle_dir(cache), model_version=version,
                               manifest_sha256=(mv.tags or {}).get(MANIFEST_SHA_TAG),
                               trusted_roots=[Path(settings.home) / CACHE_DIR])
        except (BundleIntegrityError, FileNotFoundError) as exc:
            if attempt == 2:
                raise
            log.warning("cached model version %s failed verification (%s); deleting %s and downloading it again "
                        "from the registry", version, exc, cache)
            shutil.rmtree(cache, ignore_errors=True)
    raise AssertionError("unreachable")
