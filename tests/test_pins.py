"""The direct dependencies in pyproject.toml are exact pins that requirements.lock (what `make setup` installs)
agrees with, and the test tooling CI runs (pytest, schemathesis) is among them: a lock rebuilt from pyproject
cannot silently drop or move it."""
from __future__ import annotations

import re
import tomllib

from ground.settings import PROJECT_ROOT


def _name(raw: str) -> str:
    return re.sub(r"[-_.]+", "-", raw).lower()


def test_direct_dependencies_are_pinned_as_in_the_lock() -> None:
    direct = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lock = {_name(n): v for n, _, v in (line.strip().partition("==")
                                       for line in (PROJECT_ROOT / "requirements.lock").read_text().splitlines())
            if v and not n.startswith("#")}
    pins = {}
    for spec in direct:
        name, sep, version = spec.partition("==")
        assert sep and version, f"{spec!r} is not an exact pin"
        pins[_name(name)] = version
    assert {n: v for n, v in pins.items() if lock.get(n) != v} == {}
    assert {"pytest", "schemathesis"} <= set(pins)
