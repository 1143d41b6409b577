"""A/B helpers of the micro benches: a function as of a git revision, and its CPU and wall seconds."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]


def function_at_ref(ref: str, path: str, name: str) -> Callable[..., Any]:
    """`name` from the module at `path` as of git `ref` (exec'd from `git show`; its imports are today's)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{path}"], check=True, capture_output=True,
                         text=True).stdout
    ns: dict = {"__name__": f"{Path(path).stem}_at_ref"}
    exec(compile(src, f"{ref}:{path}", "exec"), ns)
    return ns[name]


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
    """fn(*args), its CPU seconds (this process) and its wall seconds."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn(*args)
    return out, time.process_time() - c0, time.perf_counter() - w0
