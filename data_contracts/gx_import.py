"""Import Great Expectations safely in every kind of process (the one place that imports it).

Why this exists: GX imports `pyspark.sql.connect.dataframe` (in a try/except ImportError) to know
whether Spark Connect is there. `pyspark.sql.connect/__init__.py` runs `check_dependencies()`, which
takes a process whose `__main__` has neither `__spec__` nor `__file__` for a *doctest run* and calls
`sys.exit(0)` when the Spark Connect extras (grpcio, googleapis-common-protos, zstandard) are missing.
Every `python -c` process looks like that, and so does every step process Dagster's multiprocess
executor spawns (multiprocessing's spawn/forkserver children start from `python -c`): launching
`ingest_events` from the UI or `dagster job launch` killed `silver_events` with `SystemExit: 0`.

In an ordinary process the same import raises `PySparkImportError` (an ImportError), which GX treats as
"no Spark Connect". `import_great_expectations` gives every process that outcome: it imports
`pyspark.sql.connect` once with `__main__` marked as a `-c` program, and when the extras are missing
it records the package as absent (`sys.modules[...] = None`), so any later import of it raises
ImportError instead of exiting. Kairos runs classic Spark (local or a master URL), never Connect.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
from types import ModuleType
from typing import Iterator

log = logging.getLogger(__name__)

_CONNECT = "pyspark.sql.connect"


@contextlib.contextmanager
def _main_module_looks_initialised() -> Iterator[None]:
    """Give an uninitialised `__main__` (a `python -c` program, a spawned child) a `__file__` for the
    duration of the block, so pyspark's doctest heuristic does not fire; removed afterwards so that
    multiprocessing's own view of `__main__` is unchanged."""
    main = sys.modules.get("__main__")
    patch = (main is not None and getattr(main, "__spec__", None) is None and not hasattr(main, "__file__")
             and not hasattr(sys, "ps1"))
    if patch and main is not None:
        main.__file__ = "<string>"  # what `python -c` means
    try:
        yield
    finally:
        if patch and main is not None:
            with contextlib.suppress(AttributeError):
                del main.__file__


def guard_spark_connect_import() -> bool:
    """Import `pyspark.sql.connect` once, safely; True if Spark Connect is usable, False if absent."""
    if _CONNECT in sys.modules:
        return sys.modules[_CONNECT] is not None
    try:
        with _main_module_looks_initialised():
            importlib.import_module(_CONNECT)
        return True
    except ImportError as exc:  # the Connect extras are missing: what a normal process would conclude
        log.debug("Spark Connect unavailable (%s); classic Spark only", exc)
        sys.modules[_CONNECT] = None  # type: ignore[assignment]  # later imports raise ImportError, never sys.exit(0)
        return False


def import_great_expectations() -> ModuleType:
    """`import great_expectations`, safe in spawned step processes (see the module docstring)."""
    if "great_expectations" not in sys.modules:
        guard_spark_connect_import()
    import great_expectations

    return great_expectations
