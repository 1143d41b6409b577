"""Runtime settings for every Kairos process, read from the environment.

One place decides where the lake, the registry and the online store live, so the
same code runs on embedded defaults (local disk, SQLite, embedded Redis, Spark
local mode) or on a cluster by configuration alone.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# KAIROS_HOME/partition_start and partition_end: the first and last ingest day `kairos demo` derived from its data,
# so every later process on that home (`make ui`, its code server, the daemon) draws the same daily partitions
# without an export. No end recorded (or KAIROS_PARTITION_END=live): a live world, partitions run through today.
PARTITION_START_FILE = "partition_start"
PARTITION_END_FILE = "partition_end"
DEFAULT_PARTITION_START = "2026-01-01"
LIVE = "live"  # KAIROS_PARTITION_END=live: no end, whatever the home recorded


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


# The parsers every settings object uses (Settings, SparkSettings, LakeStorageSettings, EmbeddedRedisSettings,
# RedisConnectionSettings, PrivacySettings below, serving.settings.ServeSettings, serving.rerank.RerankConfig,
# monitoring.health.FreshnessThresholds, streaming.options.StreamJobOptions): a bad value fails where the settings are built, with the variable's name,
# instead of running with a silently different setting.
def env_number(env: Mapping[str, str], var: str, kind: type, default: Any, minimum: float | None = None,
               maximum: float | None = None) -> Any:
    """`env[var]` parsed as `kind` (int or float), `default` when unset or blank; a bad value raises naming the
    variable, so a typo in a deployment fails at start instead of serving with a silently different setting."""
    raw = env.get(var, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{var} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{var} must be in [{minimum if minimum is not None else '-inf'}, "
                         f"{maximum if maximum is not None else 'inf'}], got {raw!r}")
    return value


def env_flag(env: Mapping[str, str], var: str, default: bool) -> bool:
    """`env[var]` as a switch: 1/true/yes/on or 0/false/no/off (any case), `default` when unset or blank."""
    raw = env.get(var, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{var} must be one of 1/true/yes/on or 0/false/no/off, got {raw!r}")


def env_choice(env: Mapping[str, str], var: str, choices: tuple[str, ...], default: str, why: str = "") -> str:
    """`env[var]` lower-cased, one of `choices`, `default` when unset or blank; a bad value raises naming the
    variable and the choices (and `why`, what each choice means)."""
    raw = env.get(var, "").strip().lower()
    if not raw:
        return default
    if raw not in choices:
        raise ValueError(f"{var} must be one of {', '.join(choices)}, got {raw!r}" + (f" ({why})" if why else ""))
    return raw


def env_json_object(env: Mapping[str, str], var: str, what: str, example: str) -> dict[str, str]:
    """`env[var]` as a JSON object of `what` (its values as strings), {} when unset or blank; anything else raises
    naming the variable with an `example` of the expected shape."""
    raw = env.get(var, "").strip()
    if not raw:
        return {}
    expected = f"{var} must be a JSON object of {what}, e.g. '{example}'"
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{expected}: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{expected}, got a JSON {type(value).__name__}")
    return {str(k): str(v) for k, v in value.items()}


# ---------------------------------------------------------------------------------------------- Spark and the lake
SPARK_LAKE_READERS = ("auto", "python", "hadoop", "delta")  # lake.spark's module doc says what each one does
# a JVM memory size as Spark parses it (JavaUtils.byteStringAs): a number with an optional b/k/m/g/t/p(b) unit
_JVM_MEMORY = re.compile(r"[0-9]+([kmgtp]b?|b)?", re.IGNORECASE)


def validate_spark_conf(conf: Mapping[str, Any], source: str = "Spark settings") -> dict[str, str]:
    """Only `spark.*` keys are settings of a SparkSession; anything else is a typo to report, not ignore."""
    bad = sorted(str(k) for k in conf if not str(k).startswith("spark."))
    if bad:
        raise ValueError(f"{source}: Spark settings must start with 'spark.' (got {bad}); "
                         "Hadoop options are spark.hadoop.*")
    return {str(k): str(v) for k, v in conf.items()}


@dataclass(frozen=True)
class SparkSettings:
    """The Spark session's knobs (lake.spark), one read of the environment:
      KAIROS_SPARK_CONF            a JSON object of spark.* settings passed to the session as they are (they win)
      KAIROS_SPARK_DRIVER_MEMORY   spark.driver.memory, a JVM size (3g, 512m)
      KAIROS_SPARK_LAKE_READER     auto | python | hadoop | delta: how Spark reads a pinned lake snapshot
      KAIROS_SPARK_DELTA_NATIVE=1  the same as KAIROS_SPARK_LAKE_READER=delta (the reader, when that is unset)
      KAIROS_SPARK_SHUFFLE_PARTITIONS  spark.sql.shuffle.partitions, a positive integer (4)
      KAIROS_SPARK_ALLOW_LOCAL_LAKE=1  a local-path lake may be read on a non-local master (every worker mounts it)
    """

    conf: Mapping[str, str] = field(default_factory=dict)
    driver_memory: str = "3g"
    lake_reader: str = "auto"
    shuffle_partitions: int = 4
    allow_local_lake: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "SparkSettings":
        d = cls()
        conf = validate_spark_conf(env_json_object(env, "KAIROS_SPARK_CONF", "spark.* settings",
                                                   '{"spark.executor.memory": "2g"}'), "KAIROS_SPARK_CONF")
        memory = env.get("KAIROS_SPARK_DRIVER_MEMORY", "").strip() or d.driver_memory
        if not _JVM_MEMORY.fullmatch(memory):
            raise ValueError(f"KAIROS_SPARK_DRIVER_MEMORY must be a JVM memory size such as 3g or 512m, got {memory!r}")
        native = env_flag(env, "KAIROS_SPARK_DELTA_NATIVE", False)
        reader = env_choice(env, "KAIROS_SPARK_LAKE_READER", SPARK_LAKE_READERS, "delta" if native else d.lake_reader)
        return cls(conf=conf, driver_memory=memory, lake_reader=reader,
                   shuffle_partitions=env_number(env, "KAIROS_SPARK_SHUFFLE_PARTITIONS", int, d.shuffle_partitions,
                                                 minimum=1),
                   allow_local_lake=env_flag(env, "KAIROS_SPARK_ALLOW_LOCAL_LAKE", d.allow_local_lake))


@dataclass(frozen=True)
class LakeStorageSettings:
    """KAIROS_LAKE_STORAGE_OPTIONS: a JSON object of delta-rs storage options (endpoint, region, ...), for
    settings the standard AWS_* / GOOGLE_* / AZURE_* environment does not cover (lake.delta.DeltaLake)."""

    options: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "LakeStorageSettings":
        return cls(options=env_json_object(env, "KAIROS_LAKE_STORAGE_OPTIONS", "delta-rs storage options",
                                           '{"aws_region": "eu-west-1"}'))


def _recorded(home: Path, name: str, default: str) -> str:
    """The day `record_partition_start` / `record_partition_end` left under `home`, else `default`."""
    try:
        day = (home / name).read_text().strip()
    except OSError:
        return default
    return day or default


def _partition_end(home: Path) -> str | None:
    """KAIROS_PARTITION_END (a day, or `live`) if set, else the recorded end; None = live (no end)."""
    day = _env("KAIROS_PARTITION_END", _recorded(home, PARTITION_END_FILE, LIVE))
    return None if day.lower() == LIVE else day


@dataclass(frozen=True)
class Settings:
    """Where everything lives. Construct with `Settings.from_env()`."""

    home: Path
    lake_uri: str
    mlflow_tracking_uri: str
    spark_master: str
    redis_url: str | None
    model_name: str = "kairos-ranker"
    partition_start: str = DEFAULT_PARTITION_START  # first daily partition of the event assets (UTC day)
    partition_end: str | None = None  # last daily partition (a historical world's last ingest day); None = live
    shared_dir: Path = field(default_factory=lambda: PROJECT_ROOT.parent / "shared")
    mlflow_artifacts: str | None = None  # KAIROS_MLFLOW_ARTIFACTS: where new experiments keep artifacts, if set

    @classmethod
    def from_env(cls) -> "Settings":
        home = Path(_env("KAIROS_HOME", str(PROJECT_ROOT / ".kairos"))).resolve()
        return cls(
            home=home,
            lake_uri=_env("KAIROS_LAKE_URI", str(home / "lake")),
            mlflow_tracking_uri=_env("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}"),
            spark_master=_env("KAIROS_SPARK_MASTER", "local[2]"),
            redis_url=os.environ.get("REDIS_URL") or None,
            model_name=_env("KAIROS_MODEL_NAME", "kairos-ranker"),
            partition_start=_env("KAIROS_PARTITION_START", _recorded(home, PARTITION_START_FILE, DEFAULT_PARTITION_START)),
            partition_end=_partition_end(home),
            shared_dir=Path(_env("KAIROS_SHARED_DIR", str(PROJECT_ROOT.parent / "shared"))),
            mlflow_artifacts=os.environ.get("KAIROS_MLFLOW_ARTIFACTS") or None,
        )

    def record_partition_start(self, day: str) -> None:
        """Remember the data's first ingest day under KAIROS_HOME (read back by `from_env` when unset)."""
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / PARTITION_START_FILE).write_text(day + "\n")

    def record_partition_end(self, day: str | None) -> None:
        """Remember the data's last ingest day under KAIROS_HOME (None or `live`: no end, partitions run through
        today); read back by `from_env` when KAIROS_PARTITION_END is unset."""
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / PARTITION_END_FILE).write_text((day or LIVE) + "\n")

    @property
    def movielens_100k_dir(self) -> Path:
        return self.shared_dir / "data" / "movielens-100k"

    @property
    def mlflow_artifact_root(self) -> str:
        return self.mlflow_artifacts or str(self.home / "mlartifacts")


# ---------------------------------------------------------------------------------------------- Redis
# Every Redis client of Kairos is built by `redis_client` so credentials and TLS are configured once,
# and only from the environment (never in code, URLs checked into config, or files), read by
# RedisConnectionSettings.from_env:
#   REDIS_URL                  redis://host:6379/0, or rediss://… for TLS
#   REDIS_USERNAME, REDIS_PASSWORD   ACL user / password (used when the URL carries none)
#   KAIROS_REDIS_TLS=1         upgrade a redis:// URL to TLS
#   KAIROS_REDIS_TLS_CA        CA bundle that signed the server certificate
#   KAIROS_REDIS_TLS_CERT / KAIROS_REDIS_TLS_KEY   client certificate and key (mutual TLS)
#   KAIROS_REDIS_TLS_VERIFY    required (default) | none (self-signed test servers only)


APPENDFSYNC_POLICIES = ("always", "everysec", "no")


@dataclass(frozen=True)
class EmbeddedRedisSettings:
    """The embedded redis-server's durability (orchestration.services.start_redis): KAIROS_REDIS_APPENDFSYNC,
    always (default: an acknowledged write is on disk) | everysec | no."""

    appendfsync: str = "always"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "EmbeddedRedisSettings":
        return cls(appendfsync=env_choice(env, "KAIROS_REDIS_APPENDFSYNC", APPENDFSYNC_POLICIES, cls().appendfsync,
                                          "always: no acknowledged write is lost; everysec: up to 1 s may be"))


REDIS_TLS_VERIFY = ("required", "none")


@dataclass(frozen=True)
class RedisConnectionSettings:
    """Credentials and TLS of every Redis client (`redis_client`), one read of the variables listed above."""

    username: str | None = None
    password: str | None = None
    tls: bool = False  # upgrade a redis:// URL to rediss://
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_verify: str = "required"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "RedisConnectionSettings":
        def text(var: str) -> str | None:
            return env.get(var) or None

        key = text("KAIROS_REDIS_TLS_KEY")
        cert = text("KAIROS_REDIS_TLS_CERT")
        if key and not cert:
            raise ValueError("KAIROS_REDIS_TLS_KEY is set without KAIROS_REDIS_TLS_CERT: the client key needs its "
                             "certificate (set both for mutual TLS, or neither)")
        return cls(username=text("REDIS_USERNAME"), password=text("REDIS_PASSWORD"),
                   tls=env_flag(env, "KAIROS_REDIS_TLS", False), tls_ca=text("KAIROS_REDIS_TLS_CA"),
                   tls_cert=cert, tls_key=key,
                   tls_verify=env_choice(env, "KAIROS_REDIS_TLS_VERIFY", REDIS_TLS_VERIFY, "required",
                                         "none skips certificate checks, for self-signed test servers only"))


def redis_connection_kwargs(url: str, settings: RedisConnectionSettings | None = None) -> tuple[str, dict[str, Any]]:
    """(url, extra redis.Redis.from_url kwargs) with the credentials and TLS options of `settings`
    (RedisConnectionSettings.from_env() when not given)."""
    conn = settings or RedisConnectionSettings.from_env()
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme == "redis" and conn.tls:
        scheme = "rediss"
        url = urlunsplit(("rediss", *parts[1:]))
    kwargs: dict[str, Any] = {}
    if not parts.password and conn.password:
        kwargs["password"] = conn.password
        if conn.username and not parts.username:
            kwargs["username"] = conn.username
    if scheme == "rediss":
        if conn.tls_ca:
            kwargs["ssl_ca_certs"] = conn.tls_ca
        if conn.tls_cert:
            kwargs["ssl_certfile"] = conn.tls_cert
            kwargs["ssl_keyfile"] = conn.tls_key
        kwargs["ssl_cert_reqs"] = conn.tls_verify
    return url, kwargs


def redis_client(url: str, settings: RedisConnectionSettings | None = None, **kwargs: Any) -> Any:
    """A redis.Redis for `url` with the password and TLS settings of `settings` (the environment's when not
    given; decode_responses by default)."""
    import redis

    url, extra = redis_connection_kwargs(url, settings)
    kwargs.setdefault("decode_responses", True)
    return redis.Redis.from_url(url, **{**extra, **kwargs})


def redis_url_from_env(settings: Settings | None = None) -> str:
    """REDIS_URL, else the URL the embedded server wrote under KAIROS_HOME."""
    settings = settings or Settings.from_env()
    if settings.redis_url:
        return settings.redis_url
    marker = settings.home / "redis.url"
    if marker.exists():
        return marker.read_text().strip()
    raise RuntimeError(
        "No Redis configured: set REDIS_URL, or start the embedded server with `kairos redis` "
        "(the demo `kairos demo` starts one for you)."
    )


def redact_url(url: str | None) -> str:
    """The URL with any password replaced by ***, for logs and printed banners."""
    if not url:
        return ""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}{':' + str(parts.port) if parts.port else ''}"
    return urlunsplit((parts.scheme, netloc, *parts[2:]))


@dataclass(frozen=True)
class PrivacySettings:
    """KAIROS_PRIVACY_KEY: the key of the keyed user hashes (`privacy_key`); None = the generated one under
    KAIROS_HOME."""

    key: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "PrivacySettings":
        return cls(key=env.get("KAIROS_PRIVACY_KEY") or None)


def privacy_key(settings: "Settings", privacy: PrivacySettings | None = None) -> bytes:
    """The key of the keyed user hashes (audit log, exclusion list): `privacy.key`, KAIROS_PRIVACY_KEY.

    Without it, one random key is generated once under KAIROS_HOME (mode 0600) so the embedded
    defaults work; set KAIROS_PRIVACY_KEY in production (the same value everywhere: a different key
    makes the exclusion list stop matching).
    """
    key = (privacy or PrivacySettings.from_env()).key
    if key:
        return key.encode()
    path = settings.home / "privacy.key"
    if not path.exists():
        import secrets

        settings.home.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first
            return path.read_text().strip().encode()
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()
