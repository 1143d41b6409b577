"""The settings objects of ground.settings read from an environment mapping: defaults when unset, and a bad value
fails where the settings are built with a message naming the variable and what to set instead."""
from __future__ import annotations

import pytest

from ground.settings import EmbeddedRedisSettings, LakeStorageSettings, SparkSettings


def test_spark_settings_defaults_and_values() -> None:
    assert SparkSettings.from_env({}) == SparkSettings(conf={}, driver_memory="3g", lake_reader="auto",
                                                       shuffle_partitions=4, allow_local_lake=False)
    s = SparkSettings.from_env({"KAIROS_SPARK_SHUFFLE_PARTITIONS": " 16 ", "KAIROS_SPARK_ALLOW_LOCAL_LAKE": "1"})
    assert (s.shuffle_partitions, s.allow_local_lake) == (16, True)
    assert SparkSettings.from_env({"KAIROS_SPARK_ALLOW_LOCAL_LAKE": "off"}).allow_local_lake is False
    s = SparkSettings.from_env({"KAIROS_SPARK_CONF": '{"spark.executor.memory": "2g", "spark.sql.shuffle.partitions": 8}',
                                "KAIROS_SPARK_DRIVER_MEMORY": " 512m ", "KAIROS_SPARK_LAKE_READER": "Python"})
    assert s.conf == {"spark.executor.memory": "2g", "spark.sql.shuffle.partitions": "8"}
    assert (s.driver_memory, s.lake_reader) == ("512m", "python")
    assert SparkSettings.from_env({"KAIROS_SPARK_DELTA_NATIVE": "1"}).lake_reader == "delta"
    # the explicit reader wins over the delta-native switch
    assert SparkSettings.from_env({"KAIROS_SPARK_DELTA_NATIVE": "1", "KAIROS_SPARK_LAKE_READER": "hadoop"}).lake_reader \
        == "hadoop"
    for size in ("4g", "2048m", "1G", "3gb", "1073741824"):
        assert SparkSettings.from_env({"KAIROS_SPARK_DRIVER_MEMORY": size}).driver_memory == size


@pytest.mark.parametrize("env, message", [
    ({"KAIROS_SPARK_CONF": "spark.executor.memory=2g"},
     r"KAIROS_SPARK_CONF must be a JSON object of spark\.\* settings, e\.g\. '\{\"spark\.executor\.memory\""),
    ({"KAIROS_SPARK_CONF": '["spark.executor.memory"]'}, "KAIROS_SPARK_CONF must be a JSON object .*got a JSON list"),
    ({"KAIROS_SPARK_CONF": '{"executor.memory": "2g"}'},
     r"KAIROS_SPARK_CONF: Spark settings must start with 'spark\.' \(got \['executor\.memory'\]\); Hadoop options"),
    ({"KAIROS_SPARK_DRIVER_MEMORY": "lots"}, "KAIROS_SPARK_DRIVER_MEMORY must be a JVM memory size such as 3g"),
    ({"KAIROS_SPARK_DRIVER_MEMORY": "3 g"}, "KAIROS_SPARK_DRIVER_MEMORY must be a JVM memory size"),
    ({"KAIROS_SPARK_DRIVER_MEMORY": "-1g"}, "KAIROS_SPARK_DRIVER_MEMORY must be a JVM memory size"),
    ({"KAIROS_SPARK_LAKE_READER": "jdbc"},
     "KAIROS_SPARK_LAKE_READER must be one of auto, python, hadoop, delta, got 'jdbc'"),
    ({"KAIROS_SPARK_DELTA_NATIVE": "maybe"}, "KAIROS_SPARK_DELTA_NATIVE must be one of 1/true/yes/on or 0/false/no/off"),
    ({"KAIROS_SPARK_SHUFFLE_PARTITIONS": "many"}, "KAIROS_SPARK_SHUFFLE_PARTITIONS must be an integer, got 'many'"),
    ({"KAIROS_SPARK_SHUFFLE_PARTITIONS": "0"}, r"KAIROS_SPARK_SHUFFLE_PARTITIONS must be in \[1, inf\], got '0'"),
    ({"KAIROS_SPARK_ALLOW_LOCAL_LAKE": "sure"},
     "KAIROS_SPARK_ALLOW_LOCAL_LAKE must be one of 1/true/yes/on or 0/false/no/off, got 'sure'"),
])
def test_spark_settings_bad_values_say_what_to_set(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SparkSettings.from_env(env)


def test_lake_storage_settings() -> None:
    assert LakeStorageSettings.from_env({}).options == {}
    assert LakeStorageSettings.from_env({"KAIROS_LAKE_STORAGE_OPTIONS": " "}).options == {}
    env = {"KAIROS_LAKE_STORAGE_OPTIONS": '{"aws_region": "eu-west-1", "allow_http": true}'}
    assert LakeStorageSettings.from_env(env).options == {"aws_region": "eu-west-1", "allow_http": "True"}


@pytest.mark.parametrize("raw, message", [
    ("aws_region=eu-west-1",
     r"KAIROS_LAKE_STORAGE_OPTIONS must be a JSON object of delta-rs storage options, e\.g\. '\{\"aws_region\""),
    ('"eu-west-1"', "KAIROS_LAKE_STORAGE_OPTIONS must be a JSON object .*got a JSON str"),
])
def test_lake_storage_settings_bad_values_say_what_to_set(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LakeStorageSettings.from_env({"KAIROS_LAKE_STORAGE_OPTIONS": raw})


def test_embedded_redis_settings() -> None:
    assert EmbeddedRedisSettings.from_env({}).appendfsync == "always"
    assert EmbeddedRedisSettings.from_env({"KAIROS_REDIS_APPENDFSYNC": " EverySec "}).appendfsync == "everysec"
    with pytest.raises(ValueError, match="KAIROS_REDIS_APPENDFSYNC must be one of always, everysec, no, got 'sometimes' "
                                         r"\(always: no acknowledged write is lost"):
        EmbeddedRedisSettings.from_env({"KAIROS_REDIS_APPENDFSYNC": "sometimes"})


def test_the_modules_read_through_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """lake.delta, lake.spark and orchestration.services take these values from the settings objects (their
    functions keep their names and are still called with no arguments)."""
    from lake.delta import DeltaLake, storage_options_from_env
    from lake.spark_conf import conf_from_env, lake_reader, session_conf
    from orchestration.services import appendfsync_from_env

    for var in ("KAIROS_SPARK_CONF", "KAIROS_SPARK_LAKE_READER", "KAIROS_SPARK_DELTA_NATIVE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAIROS_LAKE_STORAGE_OPTIONS", '{"aws_region": "eu-west-1"}')
    assert storage_options_from_env() == {"aws_region": "eu-west-1"}
    assert DeltaLake("s3://bucket/lake").storage_options == {"aws_region": "eu-west-1"}
    monkeypatch.setenv("KAIROS_SPARK_DRIVER_MEMORY", "1g")
    assert session_conf("local[2]")["spark.driver.memory"] == "1g"
    assert session_conf("local[2]", settings=SparkSettings(driver_memory="5g"))["spark.driver.memory"] == "5g"
    monkeypatch.setenv("KAIROS_SPARK_SHUFFLE_PARTITIONS", "12")
    assert session_conf("local[2]")["spark.sql.shuffle.partitions"] == "12"
    assert session_conf("local[2]", settings=SparkSettings(shuffle_partitions=3))["spark.sql.shuffle.partitions"] == "3"
    assert conf_from_env() == {} and conf_from_env(SparkSettings(conf={"spark.a": "b"})) == {"spark.a": "b"}
    assert lake_reader("/data/lake", settings=SparkSettings(lake_reader="delta")) == "delta"
    with pytest.raises(ValueError, match="the lake reader must be one of"):
        lake_reader("/data/lake", reader="jdbc")
    monkeypatch.setenv("KAIROS_REDIS_APPENDFSYNC", "no")
    assert appendfsync_from_env() == "no"


def test_redis_connection_settings() -> None:
    from ground.settings import RedisConnectionSettings, redis_connection_kwargs

    assert RedisConnectionSettings.from_env({}) == RedisConnectionSettings()
    env = {"REDIS_USERNAME": "kairos", "REDIS_PASSWORD": "pw", "KAIROS_REDIS_TLS": "True",
           "KAIROS_REDIS_TLS_CERT": "/c.pem", "KAIROS_REDIS_TLS_KEY": "/k.pem", "KAIROS_REDIS_TLS_VERIFY": "None"}
    s = RedisConnectionSettings.from_env(env)
    assert (s.username, s.password, s.tls, s.tls_cert, s.tls_key, s.tls_verify) == \
        ("kairos", "pw", True, "/c.pem", "/k.pem", "none")
    url, kwargs = redis_connection_kwargs("redis://h:6379/0", s)  # passed down: no environment read
    assert url == "rediss://h:6379/0"
    assert kwargs == {"password": "pw", "username": "kairos", "ssl_certfile": "/c.pem", "ssl_keyfile": "/k.pem",
                      "ssl_cert_reqs": "none"}


@pytest.mark.parametrize("env, message", [
    ({"KAIROS_REDIS_TLS": "maybe"}, "KAIROS_REDIS_TLS must be one of 1/true/yes/on or 0/false/no/off, got 'maybe'"),
    ({"KAIROS_REDIS_TLS_VERIFY": "optional"},
     r"KAIROS_REDIS_TLS_VERIFY must be one of required, none, got 'optional' \(none skips certificate checks"),
    ({"KAIROS_REDIS_TLS_KEY": "/k.pem"}, "KAIROS_REDIS_TLS_KEY is set without KAIROS_REDIS_TLS_CERT"),
])
def test_redis_connection_settings_bad_values_say_what_to_set(env: dict[str, str], message: str) -> None:
    from ground.settings import RedisConnectionSettings

    with pytest.raises(ValueError, match=message):
        RedisConnectionSettings.from_env(env)


def test_privacy_settings(tmp_path) -> None:
    from ground.settings import PrivacySettings, Settings, privacy_key

    assert PrivacySettings.from_env({}).key is None and PrivacySettings.from_env({"KAIROS_PRIVACY_KEY": ""}).key is None
    assert PrivacySettings.from_env({"KAIROS_PRIVACY_KEY": "k1"}).key == "k1"
    settings = Settings(home=tmp_path, lake_uri=str(tmp_path / "lake"), mlflow_tracking_uri="", spark_master="local[1]",
                        redis_url=None)
    assert privacy_key(settings, PrivacySettings(key="k1")) == b"k1"
    generated = privacy_key(settings, PrivacySettings())
    assert len(generated) == 64 and privacy_key(settings, PrivacySettings()) == generated  # once, then reused
    assert (tmp_path / "privacy.key").stat().st_mode & 0o777 == 0o600
