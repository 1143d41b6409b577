"""Loopback stand-ins for the cluster configuration, for tests: an S3 lake on moto's server."""
from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Iterator

import pytest

_MOTO: dict[str, object] = {}


def moto_endpoint(workdir: Path) -> str:
    """One moto S3 server per pytest process (started on first use)."""
    from orchestration.services import start_moto_s3

    if "server" not in _MOTO or not _MOTO["server"].alive():  # type: ignore[union-attr]
        _MOTO["server"] = start_moto_s3(workdir / "moto")
    return _MOTO["server"].url  # type: ignore[union-attr]


def s3_env(endpoint: str) -> dict[str, str]:
    """What delta-rs (and the executors, through it) need to reach the loopback S3 API."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "kairos-test", "AWS_SECRET_ACCESS_KEY": "kairos-test",
            "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}


def new_bucket(endpoint: str) -> str:
    import boto3

    name = f"kairos-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="kairos-test", aws_secret_access_key="kairos-test",
                 region_name="us-east-1").create_bucket(Bucket=name)
    return name


@contextlib.contextmanager
def s3_lake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on the moto server; the AWS_* environment set for the test; yields the lake root URI."""
    endpoint = moto_endpoint(tmp_path)
    for k, v in s3_env(endpoint).items():
        monkeypatch.setenv(k, v)
    yield f"s3://{new_bucket(endpoint)}/lake"
