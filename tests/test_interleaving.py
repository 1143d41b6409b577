"""Team-draft interleaving: the merged list is fair and complete, credit goes to the team that placed
the clicked slot, and a ranker users prefer wins on simulated clicks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import redis

from serving.interleaving import attribute_clicks, interleave_answers, interleaving_winner, team_draft
from serving.impressions import ImpressionLogger, impression_record, read_impressions
from tests._env import SERVER_ENV


def test_team_draft_takes_each_teams_best_unseen_item_and_balances_picks() -> None:
    a = ["i1", "i2", "i3", "i4", "i5"]
    b = ["i3", "i1", "i6", "i7", "i8"]
    for seed in range(20):
        merged, teams = team_draft(a, b, 6, np.random.default_rng(seed))
        assert len(merged) == 6 == len(set(merged)) and len(teams) == 6
        counts = {t: teams.count(t) for t in ("champion", "challenger")}
        assert abs(counts["champion"] - counts["challenger"]) <= 1 and counts["champion"] == counts["challenger"]
        # each team's picks appear in its own list order
        for team, source in (("champion", a), ("challenger", b)):
            picks = [m for m, t in zip(merged, teams) if t == team]
            assert picks == sorted(picks, key=source.index)
        # the first slot is one of the two lists' top items
        assert merged[0] in {"i1", "i3"}
    # deterministic for a seed, and both teams get to pick first across seeds
    assert team_draft(a, b, 6, np.random.default_rng(3)) == team_draft(a, b, 6, np.random.default_rng(3))
    firsts = {team_draft(a, b, 6, np.random.default_rng(s))[1][0] for s in range(20)}
    assert firsts == {"champion", "challenger"}


def test_team_draft_when_one_list_runs_out_or_lists_are_identical() -> None:
    merged, teams = team_draft(["x"], ["a", "b", "c", "d"], 4, np.random.default_rng(0))
    assert sorted(merged) == ["a", "b", "c", "x"] and teams.count("champion") == 1
    same = ["a", "b", "c", "d"]
    merged, teams = team_draft(same, same, 4, np.random.default_rng(1))
    assert merged == same  # identical rankings interleave to the same list
    assert team_draft([], [], 5, np.random.default_rng(0)) == ([], [])


def _answer(version: str, items: list[str]) -> dict:
    return {"request_id": "r1", "user_id": "u1", "model_version": version, "served_by": "two_stage",
            "ranked_items": [{"item_id": i, "score": 1.0 - k / 10, "rank": k + 1, "propensity": 1.0}
                             for k, i in enumerate(items)],
            "latency_breakdown_ms": {"total": 2.0, "ranking_inference": 1.0}}


def test_interleaved_answer_logs_the_team_of_every_slot(redis_client) -> None:
    a, b = _answer("1", ["i1", "i2", "i3", "i4"]), _answer("2", ["i9", "i8", "i1", "i7"])
    request = {"user_id": "u1", "session_id": "s1", "device_type": "mobile"}
    rec_a = impression_record(a, request, 1000, {i: {"f": 1.0} for i in ["i1", "i2", "i3", "i4"]})
    rec_b = impression_record(b, request, 1000, {i: {"f": 2.0} for i in ["i9", "i8", "i1", "i7"]})
    answer, record = interleave_answers(a, b, 4, np.random.default_rng(0), rec_a, rec_b)
    assert [it["rank"] for it in answer["ranked_items"]] == [1, 2, 3, 4]
    assert answer["model_version"] == "1+2" and answer["latency_breakdown_ms"]["total"] == 4.0
    teams = {it["item_id"]: it["team"] for it in answer["ranked_items"]}
    assert set(teams.values()) == {"champion", "challenger"}
    assert record["latency_ms"] == 4.0 and set(record["features"]) == set(teams)
    logger = ImpressionLogger(redis_client, stream="test:interleave")
    logger({**record, "experiment": "ranker-v2", "arm": "interleave"})
    logger.close()
    rows, _ = read_impressions(redis_client, stream="test:interleave")
    assert dict(zip(rows["item_id"], rows["team"])) == teams
    assert (rows["arm"] == "interleave").all() and rows["latency_ms"].tolist() == [4.0] * 4


def test_clicks_credit_the_latest_impression_within_the_window() -> None:
    imp = pd.DataFrame({"request_id": ["r1", "r2", "r3"], "user_id": ["u1", "u1", "u2"], "item_id": ["a", "a", "a"],
                        "request_ts": [1_000, 5_000, 1_000]})
    clicks = pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["a", "a"], "timestamp": [6_000, 1_000 + 10_000]})
    out = attribute_clicks(imp, clicks, window_ms=5_000)
    assert out["clicked"].tolist() == [False, True, False]  # r2 is the latest; u2's click came too late
    assert not attribute_clicks(imp, clicks.iloc[:0], 5_000)["clicked"].any()


def test_interleaving_finds_the_ranker_simulated_users_prefer() -> None:
    """Users click by a known relevance; the challenger ranks by it, the champion by noise: the
    challenger must win the interleaving, and two identical rankers must not separate."""
    rng = np.random.default_rng(7)
    n_items, n_requests = 60, 400
    rows, clicks = [], []
    for r in range(n_requests):
        relevance = rng.random(n_items)
        good = [f"i{i}" for i in np.argsort(-relevance)[:10]]
        noisy = [f"i{i}" for i in rng.permutation(n_items)[:10]]
        merged, teams = team_draft(noisy, good, 10, np.random.default_rng(r))
        for pos, (item, team) in enumerate(zip(merged, teams)):
            rows.append({"request_id": f"r{r}", "user_id": f"u{r}", "item_id": item, "request_ts": 10 * r,
                         "team": team})
            if rng.random() < relevance[int(item[1:])] ** 3 * 0.85 ** pos:
                clicks.append({"user_id": f"u{r}", "item_id": item, "timestamp": 10 * r + 1})
    result = interleaving_winner(pd.DataFrame(rows), pd.DataFrame(clicks), window_ms=5)
    assert result["winner"] == "challenger" and result["p_value"] < 1e-6, result
    assert result["wins_challenger"] > 2 * result["wins_champion"] and result["delta"] > 0.3

    rows = []
    clicked = []
    for r in range(n_requests):
        ranking = [f"i{i}" for i in rng.permutation(n_items)[:10]]
        merged, teams = team_draft(ranking, ranking, 10, np.random.default_rng(r))
        for pos, (item, team) in enumerate(zip(merged, teams)):
            rows.append({"request_id": f"r{r}", "user_id": f"u{r}", "item_id": item, "request_ts": 0, "team": team,
                         "clicked": bool(rng.random() < 0.2 * 0.85 ** pos)})
            clicked.append(rows[-1]["clicked"])
    tie = interleaving_winner(pd.DataFrame(rows))
    assert tie["p_value"] > 0.01 and abs(tie["delta"]) < 0.15, tie
    assert tie["requests"] == n_requests


@pytest.mark.parametrize("n", [1, 3, 10])
def test_team_draft_respects_n(n: int) -> None:
    merged, teams = team_draft([f"a{i}" for i in range(5)], [f"b{i}" for i in range(5)], n, np.random.default_rng(0))
    assert len(merged) == min(n, 10) == len(teams)


# ------------------------------------------------------------------------------- through a real server
from tests.test_serving import _request, snapshot, store, trained  # noqa: E402,F401 - shared fixtures


def _inverted(outcome, training_set):
    """The same bundle with a ranker trained on inverted labels: it ranks what users like last."""
    import dataclasses

    import lightgbm as lgb

    from features.functions import assemble_features
    from training.ranker import add_embedding_affinity

    train = training_set[training_set["split"] == "train"]
    cols = outcome.bundle.manifest.get("ranker_features") or outcome.booster.feature_name()
    x = assemble_features(add_embedding_affinity(train, outcome.two_tower))[cols].to_numpy(float)
    booster = lgb.train({"objective": "binary", "verbose": -1, "seed": 7, "num_threads": 1},
                        lgb.Dataset(x, label=1 - train["label_binary"].to_numpy(), feature_name=list(cols)), 60)
    return dataclasses.replace(outcome.bundle, ranker=booster)


@pytest.mark.e2e
def test_interleaving_mode_on_a_real_server(trained, snapshot, store, small_world, redis_server, settings,
                                            tmp_path) -> None:
    """KAIROS_EXPERIMENT_MODE=interleave: every answer is a team draft of champion and challenger, each
    slot's team is logged, and simulated users (the world's tastes) make the champion win."""
    import os
    import time

    import httpx

    from orchestration.services import free_port
    from serving.server import start_server, stop_server, wait_ready
    from training.gates import GateResult
    from training.registry import register_bundle

    outcome, training_set = trained
    _, _, _, now_ms = snapshot
    champion_dir = outcome.bundle.save(tmp_path / "champion")
    challenger_dir = _inverted(outcome, training_set).save(tmp_path / "challenger")
    v1 = register_bundle(settings, champion_dir, outcome.metrics, {}, {"test": "interleave"},
                         GateResult(True, ["test"], {}))
    v2 = register_bundle(settings, challenger_dir, outcome.metrics, {}, {"test": "interleave"},
                         GateResult(False, ["test: challenger only"], {}))
    port = free_port()
    env = {**os.environ, **SERVER_ENV, "KAIROS_HOME": str(settings.home), "REDIS_URL": redis_server.url, "KAIROS_MODEL_POLL_S": "1",
           "KAIROS_EXPERIMENT": "ilv:1.0", "KAIROS_EXPERIMENT_MODE": "interleave", "KAIROS_ACCESS_LOG": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = start_server(port, env=env, log_path=tmp_path / "server.log")
    world = small_world
    rng = np.random.default_rng(11)
    clicks = []
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, timeout_s=120, proc=proc)
        with httpx.Client(base_url=base, timeout=30) as http:
            deadline = time.time() + 60
            while time.time() < deadline and http.post("/v1/status", json={}).json().get("challenger_version") != v2:
                time.sleep(0.2)
            for k in range(80):
                user = f"u{k % 120:05d}"
                body = http.post("/v1/personalize", json=_request(user, session=f"ilv-{k}", ts=now_ms + k)).json()
                assert body["experiment"] == {"name": "ilv", "arm": "interleave"}, body
                assert body["interleaving"] == {"champion": v1, "challenger": v2}
                teams = [it["team"] for it in body["ranked_items"]]
                assert len(teams) == 10 and abs(teams.count("champion") - teams.count("challenger")) <= 1
                u = int(user[1:])
                for it in body["ranked_items"]:
                    i = int(it["item_id"][1:])
                    rel = world.item_quality[i] + 3.0 * world.tastes[u, world.item_cat[i]]
                    if rng.random() < 0.85 ** (it["rank"] - 1) / (1.0 + np.exp(-(rel - 2.2))):
                        clicks.append({"user_id": user, "item_id": it["item_id"], "timestamp": now_ms + k + 1})
            deadline = time.time() + 10
            while time.time() < deadline and http.post("/v1/status", json={}).json()["impressions"]["queued"]:
                time.sleep(0.1)
            time.sleep(0.3)
    finally:
        stop_server(proc)
    logged, _ = read_impressions(redis.Redis.from_url(redis_server.url, decode_responses=True))
    logged = logged[logged["experiment"] == "ilv"]
    assert logged["request_id"].nunique() == 80 and set(logged["team"]) == {"champion", "challenger"}
    assert (logged["arm"] == "interleave").all() and logged["latency_ms"].notna().all()
    result = interleaving_winner(logged, pd.DataFrame(clicks), window_ms=1000)
    print(f"\ninterleaving over 80 requests: {result}")
    assert result["winner"] == "champion" and result["p_value"] < 0.01, result
