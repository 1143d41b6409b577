"""Deterministic experiment assignment, and shadow/experiment fields through the real impression stream."""
from __future__ import annotations

import pytest

from serving.experiments import CHALLENGER_ARM, CHAMPION_ARM, Experiment, assign, bucket
from serving.impressions import ImpressionLogger, impression_record, read_impressions


def test_assignment_is_deterministic_and_respects_the_share() -> None:
    exp = Experiment("ranker-v2", 0.10)
    users = [f"u{k:05d}" for k in range(20_000)]
    arms = [assign(exp, u) for u in users]
    assert arms == [assign(exp, u) for u in users]  # same user, same arm, every time
    share = arms.count(CHALLENGER_ARM) / len(arms)
    assert 0.09 < share < 0.11
    reshuffled = [assign(Experiment("ranker-v3", 0.10), u) for u in users]
    assert reshuffled != arms  # a new experiment name draws new groups
    assert assign(None, "u1") == CHAMPION_ARM and assign(Experiment("x", 0.0), "u1") == CHAMPION_ARM
    assert assign(Experiment("x", 1.0), "u1") == CHALLENGER_ARM
    assert 0.0 <= bucket("x", "u1") < 1.0


def test_experiment_config_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KAIROS_EXPERIMENT", raising=False)
    assert Experiment.from_env() is None
    monkeypatch.setenv("KAIROS_EXPERIMENT", "ranker-v2:0.25")
    assert Experiment.from_env() == Experiment("ranker-v2", 0.25)
    for bad in ("ranker-v2", "ranker-v2:lots", ":0.1", "x:1.5"):
        monkeypatch.setenv("KAIROS_EXPERIMENT", bad)
        with pytest.raises(ValueError, match="KAIROS_EXPERIMENT"):
            Experiment.from_env()


def test_arm_and_shadow_travel_through_the_impression_stream(redis_client) -> None:
    logger = ImpressionLogger(redis_client, stream="test:exp")
    served = {"request_id": "r1", "ranked_items": [{"item_id": "i1", "score": 0.9, "rank": 1}], "model_version": 4,
              "served_by": "two_stage", "experiment": {"name": "ranker-v2", "arm": "challenger"}}
    request = {"user_id": "u1", "session_id": "s1", "device_type": "mobile"}
    logger(impression_record(served, request, 1, None))
    shadow = impression_record({**served, "request_id": "r2:shadow", "experiment": None}, request, 1, None)
    logger({**shadow, "shadow": True, "arm": "challenger"})
    logger.close()
    rows, _ = read_impressions(redis_client, stream="test:exp")
    assert rows[["request_id", "experiment", "arm", "shadow"]].values.tolist() == [
        ["r1", "ranker-v2", "challenger", False], ["r2:shadow", None, "challenger", True]]
