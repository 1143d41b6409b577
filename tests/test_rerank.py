"""Candidate channels and re-ranking: MMR, category runs, exploration with propensities."""
from __future__ import annotations

import time

import numpy as np
import pytest

from serving.candidates import Channel, co_visitation, fresh_items, run_channels
from serving.rerank import explore, limit_category_runs, mmr, request_rng


def test_mmr_trades_relevance_for_diversity() -> None:
    scores = np.array([1.0, 0.99, 0.98, 0.5])
    vectors = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float32)  # three clones and one different item
    order = np.argsort(-scores)
    assert mmr(order, scores, vectors, 2, 1.0) == [0, 1]  # lambda 1: pure relevance
    assert mmr(order, scores, vectors, 2, 0.5) == [0, 3]  # the different item beats a clone


def test_category_runs_are_broken_by_the_next_other_item() -> None:
    cat = {0: "a", 1: "a", 2: "a", 3: "a", 4: "b", 5: "a"}
    assert limit_category_runs([0, 1, 2, 3, 5], [4], cat, 2) == [0, 1, 4, 2, 3]
    assert limit_category_runs([0, 1, 2, 3], [], cat, 2) == [0, 1, 2, 3]  # nothing else to move up: kept
    assert limit_category_runs([0, 1, 2], [4], cat, 0) == [0, 1, 2]  # 0 = rule off


def test_exploration_logs_propensities_and_is_seeded_per_request() -> None:
    picked, pool = list(range(10)), list(range(200))
    out, props = explore(picked, pool, 0.5, request_rng("req-1"))
    again, props2 = explore(picked, pool, 0.5, request_rng("req-1"))
    assert out == again and props == props2 and out[0] == 0 and props[0] == 1.0
    swapped = [k for k in range(1, 10) if out[k] != picked[k]]
    assert swapped and all(props[k] == 0.5 / 190 for k in swapped)
    assert all(props[k] == 0.5 for k in range(1, 10) if k not in swapped)
    assert len(set(out)) == 10
    assert explore(picked, pool, 0.0, request_rng("x")) == (picked, [1.0] * 10)
    # over many requests about epsilon of the slots explore
    rates = [sum(o != p for o, p in zip(explore(picked, pool, 0.05, request_rng(f"r{i}"))[0], picked)) / 9
             for i in range(400)]
    assert 0.03 < np.mean(rates) < 0.07


def test_exploration_from_slot_7_keeps_the_budget_and_the_head() -> None:
    """From slot 7 on, only positions 8-10 of a 10-slot screen explore, each at epsilon * 9 / 3: as many explored
    items per screen on average as epsilon anywhere after the first slot, where a miss costs less NDCG. A longer
    list explores every slot from 7 at that rate, so its first screen is drawn like a 10-item list."""
    picked, pool = list(range(10)), list(range(200))
    out, props = explore(picked, pool, 0.05, request_rng("req-1"), first=7)
    assert out[:7] == picked[:7] and props[:7] == [1.0] * 7
    assert all(props[k] in (1.0 - 0.15, 0.15 / 190) for k in range(7, 10))
    runs = [explore(picked, pool, 0.05, request_rng(f"r{i}"), first=7)[0] for i in range(600)]
    assert all(o[:7] == picked[:7] for o in runs)
    assert 0.03 < np.mean([sum(o != p for o, p in zip(r, picked)) / 9 for r in runs]) < 0.07
    long_out, long_props = explore(list(range(20)), pool, 0.05, request_rng("req-2"), first=7)
    assert long_out[:7] == list(range(7)) and all(p in (1.0 - 0.15, 0.15 / 180) for p in long_props[7:])
    assert all(q <= 1.0 for q in explore(picked, pool, 0.9, request_rng("x"), first=8)[1])  # the rate is capped at 1


def test_co_visitation_and_fresh_channels() -> None:
    co = {"a": {"x": 5.0, "y": 1.0}, "b": {"y": 4.0, "z": 1.0}}
    assert co_visitation(co, ["a", "b"], 2) == ["x", "y"]  # y: 1 + 4/2 = 3 < x: 5
    ids = ["old", "new", "unindexed", "future"]
    now = 100 * 3_600_000
    publish = np.array([0.0, now - 3_600_000, now - 500 * 3_600_000, now + 3_600_000])
    assert fresh_items(ids, publish, {"old": 0, "new": 1, "future": 3}, now, 5) == ["new", "unindexed"]


def test_channels_merge_dedupe_exclude_and_survive_failures() -> None:
    def slow(k: int) -> list[str]:
        time.sleep(0.02)
        return ["s1"]

    def broken(k: int) -> list[str]:
        raise RuntimeError("boom")

    producers = {"ann": lambda k: [f"a{i}" for i in range(k)], "trending": lambda k: ["t1", "a1", "seen"],
                 "co_visitation": broken, "fresh": slow}
    channels = (Channel("ann", 0.6, 50), Channel("co_visitation", 0.2, 5), Channel("trending", 0.1, 5),
                Channel("fresh", 0.1, 5))
    out, contributed, errors = run_channels(producers, 10, {"seen"}, channels)
    assert len(out) == 10 and len(set(out)) == 10 and "seen" not in out
    assert out[0] == "t1" and contributed["trending"] == 1 and contributed["ann"] == 9
    assert set(errors) == {"co_visitation", "fresh"} and "boom" in errors["co_visitation"] and "timeout" in errors["fresh"]


def test_thompson_sampling_explores_by_uncertainty_and_logs_true_propensities() -> None:
    from serving.rerank import RerankConfig, thompson

    rng0 = np.random.default_rng(0)
    scores = np.sort(rng0.uniform(0.05, 0.6, 40))[::-1].copy()  # candidate i has the i-th best probability
    picked, pool = list(range(10)), list(range(40))
    out, props = thompson(picked, pool, scores, 50.0, request_rng("req-t"))
    assert (out, props) == thompson(picked, pool, scores, 50.0, request_rng("req-t"))  # seeded per request
    assert out[0] == 0 and props[0] == 1.0 and len(set(out)) == 10 and set(out) <= set(range(20))
    assert all(1 / 201 <= p <= 1.0 for p in props)
    # the logged propensity is what the policy really does: re-run the same policy many times and count
    counts: dict[tuple[int, int], int] = {}
    runs = 3000
    for i in range(runs):
        o, _ = thompson(picked, pool, scores, 50.0, request_rng(f"r{i}"))
        for slot, item in enumerate(o):
            counts[(slot, item)] = counts.get((slot, item), 0) + 1
    for slot in range(1, 10):
        empirical = counts.get((slot, out[slot]), 0) / runs
        assert props[slot] == pytest.approx(empirical, abs=0.06), (slot, props[slot], empirical)
    # more pseudo-observations = more confidence = closer to the greedy order
    def changed(strength: float) -> float:
        return np.mean([sum(a != b for a, b in zip(thompson(picked, pool, scores, strength, request_rng(f"s{i}"))[0], picked))
                        for i in range(200)])
    assert changed(5000.0) < changed(50.0) < changed(2.0)
    with pytest.raises(ValueError, match="KAIROS_EXPLORATION"):
        RerankConfig(exploration="ucb")


def test_channel_budgets_follow_the_request_budget() -> None:
    from serving.candidates import CANDIDATE_BUDGET_SHARE, DEFAULT_CHANNELS, channels_for_budget

    assert channels_for_budget(None) == DEFAULT_CHANNELS
    assert channels_for_budget(10_000) == DEFAULT_CHANNELS  # never above the defaults
    tight = channels_for_budget(20.0)
    total = sum(c.timeout_ms for c in tight)
    assert total == pytest.approx(CANDIDATE_BUDGET_SHARE * 20.0)
    ratios = {c.name: c.timeout_ms / d.timeout_ms for c, d in zip(tight, DEFAULT_CHANNELS)}
    assert len({round(r, 9) for r in ratios.values()}) == 1  # split in proportion to the defaults
    # a channel slower than its shrunk budget is dropped, the request still fills its pool from the others
    def slow_ann(k: int) -> list[str]:
        time.sleep(0.01)
        return [f"a{i}" for i in range(k)]

    producers = {"ann": slow_ann, "trending": lambda k: [f"t{i}" for i in range(k)]}
    out, contributed, errors = run_channels(producers, 10, set(), tight)
    assert "timeout" in errors["ann"] and contributed["trending"] == len(out) > 0
    out, _, errors = run_channels(producers, 10, set(), channels_for_budget(100.0))
    assert not errors and len(out) == 10


def test_settings_come_from_the_environment_only_through_from_env() -> None:
    """Defaults are constants; the documented KAIROS_* variables set them through from_env, and a bad value
    names its variable (a typo fails the server's start instead of serving a silently different setting)."""
    from serving.rerank import RerankConfig
    from serving.settings import ServeSettings

    assert RerankConfig.from_env({}) == RerankConfig()
    cfg = RerankConfig.from_env({"KAIROS_MMR_LAMBDA": "0.8", "KAIROS_MAX_CATEGORY_RUN": "3",
                                 "KAIROS_EXPLORATION_EPSILON": "0", "KAIROS_EXPLORATION": "thompson",
                                 "KAIROS_THOMPSON_STRENGTH": "20", "KAIROS_REPEAT_SURFACES": "watch_again, reorder",
                                 "KAIROS_SESSION_INTENT_SLOT_SHARE": "0"})
    assert cfg == RerankConfig(mmr_lambda=0.8, max_category_run=3, epsilon=0.0, exploration="thompson",
                               thompson_strength=20.0, repeat_surfaces=("watch_again", "reorder"), intent_slot_share=0.0)
    for var, bad in (("KAIROS_MMR_LAMBDA", "high"), ("KAIROS_EXPLORATION_EPSILON", "1.5"),
                     ("KAIROS_MAX_CATEGORY_RUN", "2.5"), ("KAIROS_EXPLORATION", "ucb"), ("KAIROS_THOMPSON_STRENGTH", "0")):
        with pytest.raises(ValueError, match=var):
            RerankConfig.from_env({var: bad})
    serve = ServeSettings.from_env({"KAIROS_MODEL_POLL_S": "1", "KAIROS_SERVE_WORKERS": "2", "KAIROS_ACCESS_LOG": "0",
                                    "KAIROS_API_KEY": "k", "KAIROS_STALE_FEATURES_MAX_AGE_S": "60",
                                    "KAIROS_EXPLORATION_EPSILON": "0"})
    assert (serve.model_poll_s, serve.worker_count, serve.access_log, serve.api_key, serve.stale_max_age_s) == (1.0, 2, False, "k", 60.0)
    assert serve.rerank.epsilon == 0.0 and ServeSettings.from_env({}) == ServeSettings()
    assert ServeSettings.from_env({"KAIROS_FRESH_WINDOW": "50", "KAIROS_ITEM_CACHE_ROWS": "10",
                                   "KAIROS_STREAM_MAX_BACKLOG": "5"}) == ServeSettings(fresh_window=50, item_cache_rows=10,
                                                                                       max_backlog=5)
    for var, bad in (("KAIROS_SERVE_THREADS", "four"), ("KAIROS_IMPRESSION_LOG", "maybe"), ("KAIROS_MAX_BODY_BYTES", "0"),
                     ("KAIROS_FRESH_WINDOW", "1000000"), ("KAIROS_STREAM_MAX_BACKLOG", "lots")):
        with pytest.raises(ValueError, match=var):
            ServeSettings.from_env({var: bad})


def test_importing_serving_reads_no_environment() -> None:
    """A bad value in the shell does not break an import (only the entry point's from_env sees it), and the
    in-process defaults are the documented constants whatever was exported."""
    import os
    import subprocess
    import sys

    from ground.settings import PROJECT_ROOT

    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "KAIROS_MMR_LAMBDA": "not-a-number",
           "KAIROS_EXPLORATION_EPSILON": "0.5", "KAIROS_SESSION_INTENT_SLOT_SHARE": "x",
           "KAIROS_STALE_FEATURES_MAX_AGE_S": "x", "KAIROS_FRESH_WINDOW": "x", "KAIROS_ITEM_CACHE_ROWS": "x",
           "KAIROS_BRONZE_WINDOW_MS": "x", "KAIROS_STREAM_MAX_BACKLOG": "x"}
    code = ("import serving.pipeline, serving.rerank, serving.candidates, serving.settings, features.online, "
            "streaming.bronze, streaming.retention, streaming.intake\n"
            "from serving.rerank import RerankConfig\n"
            "assert RerankConfig().epsilon == 0.05 and RerankConfig().mmr_lambda == 0.95, RerankConfig()\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=str(PROJECT_ROOT))
    assert out.returncode == 0, out.stderr


def test_serve_settings_carry_the_experiment_switches() -> None:
    """KAIROS_EXPERIMENT(_MODE), KAIROS_SHADOW and KAIROS_CANARY_SHARE are read with the other serving settings, once,
    and a bad value fails there naming its variable (not at the first request)."""
    from serving.experiments import INTERLEAVE, Experiment
    from serving.settings import ServeSettings

    serve = ServeSettings.from_env({"KAIROS_EXPERIMENT": "v2:0.25", "KAIROS_EXPERIMENT_MODE": "interleave",
                                    "KAIROS_SHADOW": "1", "KAIROS_CANARY_SHARE": "0.5"})
    assert (serve.experiment, serve.shadow, serve.canary_share) == (Experiment("v2", 0.25, mode=INTERLEAVE), True, 0.5)
    assert (ServeSettings().experiment, ServeSettings().shadow, ServeSettings().canary_share) == (None, False, None)
    for var, bad in (("KAIROS_EXPERIMENT", "v2"), ("KAIROS_SHADOW", "maybe"), ("KAIROS_CANARY_SHARE", "1.5")):
        with pytest.raises(ValueError, match=var):
            ServeSettings.from_env({var: bad})
