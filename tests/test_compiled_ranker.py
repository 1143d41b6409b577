"""The compiled ranker (serving/compiled_ranker.py): built from the bundle's exported ranker.txt, equal to
LightGBM's own predictions to 1e-6 on real feature rows, cached per model file, LightGBM when it cannot be used."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from features.functions import assemble_features
from features.registry import ranker_feature_names
from serving.compiled_ranker import PARITY_TOL, attach, compile_ranker, compiler_tag, probe_rows
from tests._trainset import make_training_set

pytestmark = pytest.mark.skipif(compiler_tag() is None, reason="lleaves/llvmlite not installed")


@pytest.fixture(scope="module")
def exported(small_world, tmp_path_factory):
    """A trained bundle saved and loaded back as serving loads it (the verified files, `source_path` set)."""
    from models.bundle import Bundle
    from training.trainer import train_bundle

    training_set = make_training_set(small_world)
    outcome = train_bundle(training_set, small_world.items, small_world.users)
    path = outcome.bundle.save(tmp_path_factory.mktemp("bundle") / "b")
    bundle = Bundle.load(path, model_version="7", allow_untrusted_path=True)
    features = assemble_features(training_set)[ranker_feature_names()].to_numpy(dtype=np.float64)
    return bundle, features


def test_compiled_predictions_equal_lightgbm_to_1e6(exported, tmp_path: Path) -> None:
    bundle, features = exported
    assert bundle.ranker_file is not None and bundle.ranker_file.name == "ranker.txt"
    assert bundle.ranker_sha256 == bundle.manifest["files_sha256"]["ranker.txt"]
    compiled = compile_ranker(bundle.ranker_file, bundle.ranker_sha256, bundle.ranker, tmp_path)
    assert compiled is not None and compiled.max_abs_diff <= PARITY_TOL
    reference = bundle.ranker.predict(features, num_threads=1)
    assert features.shape[0] > 1000 and np.ptp(reference) > 0  # real rows, scores that vary
    np.testing.assert_allclose(compiled.predict(features), reference, rtol=0, atol=PARITY_TOL)
    probes = probe_rows(bundle.ranker)  # values at, around and beyond every split threshold, NaN included
    np.testing.assert_allclose(compiled.predict(probes), bundle.ranker.predict(probes, num_threads=1), rtol=0,
                               atol=PARITY_TOL)
    for rows in (features[:1], features[:200]):  # one request's candidates, and a single row
        np.testing.assert_allclose(compiled.predict(rows), bundle.ranker.predict(rows, num_threads=1), rtol=0,
                                   atol=PARITY_TOL)


def test_cached_per_model_file_and_attached_to_the_bundle(exported, tmp_path: Path) -> None:
    bundle, features = exported
    lightgbm = bundle.rank(assemble_features_frame(features))
    assert bundle.scorer is None and bundle.scorer_name == "lightgbm"
    t = time.perf_counter()
    first = compile_ranker(bundle.ranker_file, bundle.ranker_sha256, bundle.ranker, tmp_path)
    compile_s = time.perf_counter() - t
    cached = sorted(tmp_path.glob("ranker-*.so"))
    assert first is not None and len(cached) == 1 and bundle.ranker_sha256[:32] in cached[0].name
    t = time.perf_counter()
    again = compile_ranker(bundle.ranker_file, bundle.ranker_sha256, bundle.ranker, tmp_path)
    load_s = time.perf_counter() - t
    assert again is not None and load_s < compile_s  # the second worker / restart loads the object file
    try:
        attach(bundle, tmp_path, background=False)
        assert bundle.scorer_name == "lleaves"
        np.testing.assert_allclose(bundle.rank(assemble_features_frame(features)), lightgbm, rtol=0, atol=PARITY_TOL)
    finally:
        bundle.scorer, bundle.scorer_name = None, "lightgbm"


def test_lightgbm_when_compilation_is_off_and_a_damaged_cache_is_rebuilt(exported, tmp_path: Path) -> None:
    from serving.settings import ServeSettings

    bundle, features = exported
    off = ServeSettings.from_env({"KAIROS_COMPILED_RANKER": "0"}).compiled_ranker  # what a server started so gets
    assert off is False
    assert compile_ranker(bundle.ranker_file, bundle.ranker_sha256, bundle.ranker, tmp_path, enabled=off) is None
    attach(bundle, tmp_path, background=False, enabled=off)
    assert bundle.scorer is None and not list(tmp_path.glob("ranker-*.so"))
    assert compile_ranker(bundle.ranker_file, bundle.ranker_sha256, bundle.ranker, tmp_path) is not None
    (cached,) = tmp_path.glob("ranker-*.so")
    good = cached.read_bytes()
    cached.write_bytes(good[: len(good) // 2])  # a torn write, a bad disk: LLVM would abort the process on it
    fresh = compile_ranker(bundle.ranker_file, bundle.ranker_sha256, bundle.ranker, tmp_path)
    assert fresh is not None and cached.stat().st_size == len(good)  # refused by its digest, compiled again
    np.testing.assert_allclose(fresh.predict(features[:200]), bundle.ranker.predict(features[:200], num_threads=1),
                               rtol=0, atol=PARITY_TOL)


def test_the_compiled_ranker_module_imports_no_training_code() -> None:
    code = ("import sys, serving.compiled_ranker; bad = sorted(m for m in sys.modules if m == 'training' "
            "or m.startswith('training.')); print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert done.returncode == 0, done.stdout + done.stderr


def assemble_features_frame(features: np.ndarray):
    import pandas as pd

    return pd.DataFrame(features, columns=ranker_feature_names())
