"""serving.sampler: the opt-in worker profiler sees a busy thread that is not its own, and writes its files."""
from __future__ import annotations

import threading
import time
from pathlib import Path


def _spin_for_the_sampler(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(i * i for i in range(2000))


def test_sampler_counts_another_threads_busy_stack(tmp_path: Path) -> None:
    import os
    import sys

    from serving.sampler import StackSampler

    before = sys.getswitchinterval()
    stop = threading.Event()
    busy = threading.Thread(target=_spin_for_the_sampler, args=(stop,), name="busy")
    busy.start()
    sampler = StackSampler(str(tmp_path / "prof"), interval_s=0.002).start()
    try:
        time.sleep(0.5)
    finally:
        sampler.stop()
        stop.set()
        busy.join()
        sys.setswitchinterval(before)
    base = tmp_path / f"prof.{os.getpid()}"
    collapsed = (base.with_name(base.name + ".collapsed")).read_text()
    assert "test_sampler.py:_spin_for_the_sampler" in collapsed
    table = (base.with_name(base.name + ".txt")).read_text()
    assert "CPU s per thread" in table and "busy" in table
    assert sampler.samples > 0
    assert (base.with_name(base.name + ".cpu")).read_text().count("\n") >= 1


def test_profile_and_switch_interval_settings() -> None:
    import pytest

    from serving.settings import ServeSettings

    s = ServeSettings.from_env({"KAIROS_PROFILE_OUT": "/tmp/p", "KAIROS_SWITCH_INTERVAL_MS": "1"})
    assert (s.profile_out, s.switch_interval_ms) == ("/tmp/p", 1.0)
    assert (ServeSettings().profile_out, ServeSettings().switch_interval_ms) == (None, 0.0)
    with pytest.raises(ValueError, match="KAIROS_SWITCH_INTERVAL_MS"):
        ServeSettings.from_env({"KAIROS_SWITCH_INTERVAL_MS": "fast"})
