"""Off-policy evaluation on a synthetic logged bandit whose target-policy value is known analytically."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from monitoring.ope import (SyntheticBandit, clipped_ips, effective_sample_size, evaluate_policy, importance_weights,
                            ips, slate_target_probabilities, snips)


def _world(seed: int = 0) -> SyntheticBandit:
    return SyntheticBandit.make(seed)


def _log(world: SyntheticBandit, n: int, seed: int) -> pd.DataFrame:
    return world.log(n, seed)


def test_ips_is_unbiased_and_its_interval_covers_the_truth() -> None:
    world = _world()
    truth = world.true_value
    estimates = [ips(d["reward"], d["propensity"], d["pi"]) for d in (_log(world, 2000, s) for s in range(300))]
    se = np.std(estimates) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates) - truth) < 3 * se, (np.mean(estimates), truth, se)
    # the logged (on-policy) value is clearly different: the estimator is doing real work
    logged_value = world.logging_value
    assert abs(logged_value - truth) > 10 * se
    covered = 0
    for s in range(60):
        res = evaluate_policy(_log(world, 2000, 1000 + s), "pi", n_bootstrap=300, seed=s)
        lo, hi = res.ci["ips"]
        covered += lo <= truth <= hi
    assert covered >= 0.85 * 60, covered
    one = evaluate_policy(_log(world, 5000, 7), "pi", seed=1)
    assert one.ci["ips"][0] <= truth <= one.ci["ips"][1]
    assert one.ci["ips"][0] < one.ips < one.ci["ips"][1]
    assert evaluate_policy(_log(world, 5000, 7), "pi", seed=1).ci == one.ci  # seeded: reproducible


def test_snips_has_lower_variance_than_ips() -> None:
    world = _world(3)
    logs = [_log(world, 1000, s) for s in range(300)]
    v_ips = np.var([ips(d["reward"], d["propensity"], d["pi"]) for d in logs])
    v_snips = np.var([snips(d["reward"], d["propensity"], d["pi"]) for d in logs])
    assert v_snips < 0.8 * v_ips, (v_snips, v_ips)
    m_snips = np.mean([snips(d["reward"], d["propensity"], d["pi"]) for d in logs])
    assert abs(m_snips - world.true_value) < 0.01  # its O(1/n) bias is small


def test_clipping_biases_toward_zero_and_lowers_variance() -> None:
    world = _world(5)
    truth = world.true_value
    logs = [_log(world, 1000, s) for s in range(300)]
    w_max = max(importance_weights(d["propensity"], d["pi"]).max() for d in logs)
    tight = [clipped_ips(d["reward"], d["propensity"], d["pi"], max_weight=1.0) for d in logs]
    plain = [ips(d["reward"], d["propensity"], d["pi"]) for d in logs]
    assert all(t <= p + 1e-12 for t, p in zip(tight, plain))  # rewards >= 0: clipping can only lower
    se = np.std(plain) / np.sqrt(len(plain))
    assert np.mean(tight) < truth - 5 * se  # biased downward
    assert np.var(tight) < np.var(plain)
    d = logs[0]
    assert clipped_ips(d["reward"], d["propensity"], d["pi"], max_weight=w_max + 1) == pytest.approx(
        ips(d["reward"], d["propensity"], d["pi"]))


def test_effective_sample_size_and_on_policy_identity() -> None:
    assert effective_sample_size(np.ones(50)) == pytest.approx(50)
    assert effective_sample_size(np.r_[np.ones(49), 100.0]) < 5
    world = _world(1)
    d = _log(world, 3000, 2)
    same = evaluate_policy(d, d["propensity"].to_numpy(), seed=0)  # target == logger
    assert same.ess == pytest.approx(3000) and same.ips == pytest.approx(d["reward"].mean())
    assert same.snips == pytest.approx(d["reward"].mean()) and same.identifiable
    far = evaluate_policy(d, "pi", seed=0)
    assert far.ess < same.ess
    meta = far.as_metadata()
    assert {"ips", "ips_lo", "ips_hi", "snips_lo", "ess", "identifiable"} <= set(meta)


def test_bad_inputs_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="propensit"):
        ips([1.0, 0.0], [0.0, 0.5], [0.5, 0.5])
    with pytest.raises(ValueError, match="empty"):
        snips([], [], [])
    with pytest.raises(ValueError, match="columns"):
        evaluate_policy(pd.DataFrame({"reward": [1.0]}), [1.0])
    unexplored = evaluate_policy(pd.DataFrame({"request_id": [1, 2], "reward": [1.0, 0.0], "propensity": [1.0, 1.0]}),
                                 [1.0, 1.0], n_bootstrap=50)
    assert not unexplored.identifiable and "KAIROS_EXPLORATION_EPSILON" in unexplored.notes[0]


def test_slate_probabilities_are_a_distribution_per_slot_and_match_epsilon_greedy() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=6)
    eps = 0.1
    # every possible item at slot 2 given the logged items at slots 0-1: their probabilities sum to 1
    fixed = [0, 1]
    rest = [i for i in range(6) if i not in fixed]
    total = 0.0
    for item in rest:
        order = fixed + [item] + [i for i in rest if i != item]
        log = pd.DataFrame({"request_id": "r", "position": range(6)})
        total += slate_target_probabilities(log, scores[order], epsilon=eps)[2]
    assert total == pytest.approx(1.0)
    # the logged slate in the policy's own order: slot 0 certain, later slots 1 - eps (the last has no choice)
    order = np.argsort(-scores)
    log = pd.DataFrame({"request_id": "r", "position": range(6)})
    probs = slate_target_probabilities(log, scores[order], epsilon=eps)
    assert probs[0] == 1.0 and np.allclose(probs[1:5], 1 - eps) and probs[5] == 1.0
    # a softmax policy spreads probability: the best item gets less than the greedy 1 - eps
    soft = slate_target_probabilities(log, scores[order], epsilon=eps, temperature=1.0)
    assert 0 < soft[1] < 1 - eps


def test_slate_probabilities_follow_where_serving_explores() -> None:
    """With exploration from slot 3 on (KAIROS_EXPLORATION_FROM), the slots above are the policy's best for certain
    and each later one still sums to 1 over the items that could fill it."""
    rng = np.random.default_rng(1)
    scores = rng.normal(size=6)
    order = np.argsort(-scores)
    log = pd.DataFrame({"request_id": "r", "position": range(6)})
    probs = slate_target_probabilities(log, scores[order], epsilon=0.2, first=3)
    assert np.allclose(probs[:3], 1.0) and np.allclose(probs[3:5], 0.8) and probs[5] == 1.0
    fixed = [int(i) for i in order[:3]]
    rest = [i for i in range(6) if i not in fixed]
    total = sum(slate_target_probabilities(log, scores[fixed + [item] + [i for i in rest if i != item]], epsilon=0.2,
                                           first=3)[3] for item in rest)
    assert total == pytest.approx(1.0)
    # a slot above `first` that is not the policy's best is impossible under it
    swapped = list(order[:1]) + [order[2], order[1]] + list(order[3:])
    assert slate_target_probabilities(log, scores[swapped], epsilon=0.2, first=3)[1] == 0.0


def test_slate_probabilities_share_ties_and_handle_many_requests() -> None:
    log = pd.DataFrame({"request_id": ["a"] * 3 + ["b"] * 3, "position": [2, 0, 1, 0, 1, 2]})
    # request a, slots 0..2 hold scores 0.9, 0.5, 0.5 (given out of order); request b's slot 1 ties with slot 2
    scores = np.array([0.5, 0.9, 0.5, 0.3, 0.2, 0.2])
    probs = slate_target_probabilities(log, scores, epsilon=0.1)
    # a: slot 0 is the best (certain); slot 1 ties with slot 2: greedy 1/2, exploring onto it 0.1 * (1/2) / 1
    assert probs[1] == 1.0 and probs[2] == pytest.approx(0.9 * 0.5 + 0.1 * 0.5) and probs[0] == 1.0
    assert probs[3] == 1.0 and probs[4] == pytest.approx(0.9 * 0.5 + 0.1 * 0.5) and probs[5] == 1.0
