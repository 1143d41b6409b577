"""Compiled tree inference for the served LightGBM ranker (lleaves: the trees compiled to machine code by LLVM).

The compiled scorer is built from the exported model artifact, the bundle's `ranker.txt` (the file the registry
stored and `Bundle.load` verified against its manifest), never from training code. It is compiled once per model
file: the object code is cached under KAIROS_HOME/compiled_rankers/, named by the sha256 of the ranker file and
the compiler versions, so every BentoML worker and every restart after the first loads it in milliseconds (a file
lock makes concurrent workers compile it once; a cache file is loaded only if it matches the sha256 recorded when it
was written, since LLVM aborts the process on a damaged object file). Before it serves, each compiled scorer is checked against
LightGBM's own predictions on probe rows (max |difference| <= PARITY_TOL); any failure -- lleaves or llvmlite
not installed, a compile error, a corrupt cache file, a parity miss -- leaves LightGBM serving, logged.

    KAIROS_COMPILED_RANKER=0      turn it off (LightGBM's Booster.predict serves); read by serving/settings.py at
                                  the server's start and passed here as `enabled`
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("kairos.compiled_ranker")

CACHE_DIRNAME = "compiled_rankers"
PARITY_TOL = 1e-6
PROBE_ROWS = 512


def compiler_tag() -> str | None:
    """lleaves + llvmlite versions (part of the cache key), or None when they are not installed."""
    try:
        from importlib.metadata import version

        import lleaves  # noqa: F401
        import llvmlite  # noqa: F401

        return f"lleaves{version('lleaves')}-llvmlite{version('llvmlite')}"
    except Exception:  # noqa: BLE001 - not installed: the LightGBM fallback
        return None


def probe_rows(booster: Any, n: int = PROBE_ROWS, seed: int = 0) -> np.ndarray:
    """Rows that reach many leaves: each feature drawn from the model's own split thresholds (just below, at and
    just above each), plus NaN and 0, so the parity check walks both sides of the splits the model makes."""
    dump = booster.dump_model()
    n_feat = int(dump.get("max_feature_idx", booster.num_feature() - 1)) + 1
    thresholds: list[list[float]] = [[] for _ in range(n_feat)]

    def walk(node: dict) -> None:
        if "split_feature" in node:
            t = node.get("threshold")
            if isinstance(t, (int, float)):
                thresholds[int(node["split_feature"])].append(float(t))
            walk(node["left_child"])
            walk(node["right_child"])

    for tree in dump.get("tree_info", []):
        walk(tree["tree_structure"])
    rng = np.random.default_rng(seed)
    out = np.empty((n, n_feat), dtype=np.float64)
    for j in range(n_feat):
        t = np.asarray(thresholds[j] or [0.0])
        values = np.concatenate([t, np.nextafter(t, np.inf), t - np.maximum(np.abs(t), 1.0) * 1e-3,
                                 t + np.maximum(np.abs(t), 1.0) * 1e-3, [0.0, np.nan]])
        out[:, j] = rng.choice(values, size=n)
    return out


class CompiledRanker:
    """A lleaves model compiled from a LightGBM model file; `predict(X)` = Booster.predict(X) to PARITY_TOL."""

    def __init__(self, model_file: Path, cache_file: Path) -> None:
        import lleaves

        self.model_file, self.cache_file = Path(model_file), Path(cache_file)
        self.model = lleaves.Model(model_file=str(self.model_file))
        self.model.compile(cache=str(self.cache_file))
        self.max_abs_diff: float | None = None

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.model.predict(features, n_jobs=1)

    def check_parity(self, booster: Any, rows: np.ndarray | None = None) -> float:
        rows = probe_rows(booster) if rows is None else rows
        diff = float(np.max(np.abs(self.predict(rows) - booster.predict(rows, num_threads=1))))
        self.max_abs_diff = diff
        return diff


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _cache_file(cache_dir: Path, model_sha256: str, tag: str) -> Path:
    return Path(cache_dir) / f"ranker-{model_sha256[:32]}-{tag}.so"


def compile_ranker(model_file: Path, model_sha256: str, booster: Any, cache_dir: Path,
                   enabled: bool = True) -> CompiledRanker | None:
    """The compiled scorer for `model_file` (cached by its sha256), checked against `booster`; None on any failure
    or when not `enabled` (KAIROS_COMPILED_RANKER=0 at the server's start)."""
    if not enabled:
        return None
    tag = compiler_tag()
    if tag is None:
        log.info("lleaves/llvmlite not installed: the ranker runs on LightGBM")
        return None
    import fcntl

    cache_dir = Path(cache_dir)
    target = _cache_file(cache_dir, model_sha256, tag)
    t0 = time.perf_counter()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with open(cache_dir / (target.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent workers: one compiles, the others load its file
            try:
                digest_file = target.with_name(target.name + ".sha256")
                # LLVM aborts the process on a damaged object file (no exception to catch): load one only if it
                # is byte for byte the file this cache wrote, else drop it and compile again
                cached = (target.exists() and digest_file.exists()
                          and _sha256(target) == digest_file.read_text().strip())
                if not cached:
                    target.unlink(missing_ok=True)
                    # compile to a private file, then rename: a reader never sees a half-written object file
                    tmp = target.with_suffix(f".{os.getpid()}.tmp.so")
                    CompiledRanker(model_file, tmp)
                    digest_file.write_text(_sha256(tmp))
                    os.replace(tmp, target)
                try:
                    ranker = CompiledRanker(model_file, target)
                    diff = ranker.check_parity(booster)
                except Exception:
                    target.unlink(missing_ok=True)  # a cache file that does not load: never try it again
                    raise
                if not diff <= PARITY_TOL:
                    target.unlink(missing_ok=True)
                    log.warning("compiled ranker differs from LightGBM by %.3g (> %g): LightGBM serves", diff,
                                PARITY_TOL)
                    return None
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    except Exception as exc:  # noqa: BLE001 - compilation unavailable: LightGBM serves
        log.warning("ranker not compiled (%s: %s): LightGBM serves", type(exc).__name__, exc)
        return None
    log.info("compiled ranker %s %s in %.1fs (max |diff| vs LightGBM %.2g)", model_file.name,
             "loaded from cache" if cached else "compiled", time.perf_counter() - t0, diff)
    return ranker


def attach(bundle: Any, cache_dir: Path, background: bool = True, enabled: bool = True) -> threading.Thread | None:
    """Compile `bundle`'s exported ranker file and switch `bundle.rank` to it when ready (one attribute
    assignment; LightGBM serves until then and whenever compilation fails). With `background` the work runs in a
    daemon thread (returned), so loading a model version is not held up by its first compile."""
    model_file = getattr(bundle, "ranker_file", None)
    sha = getattr(bundle, "ranker_sha256", None)
    if model_file is None or sha is None or not enabled:
        return None

    def run() -> None:
        compiled = compile_ranker(Path(model_file), sha, bundle.ranker, cache_dir)
        if compiled is not None:
            bundle.use_scorer(compiled.predict, "lleaves")

    if not background:
        run()
        return None
    thread = threading.Thread(target=run, name="kairos-ranker-compile", daemon=True)
    thread.start()
    return thread


__all__ = ["CompiledRanker", "PARITY_TOL", "attach", "compile_ranker", "compiler_tag", "probe_rows"]
