"""Team-draft interleaving of two rankers, and the credit that decides which one users prefer.

Interleaving shows one list built from both rankings: each round a coin decides which team picks
first, and each team adds its best item not already shown. A click credits the team that placed
the item, so one request compares both models on the same user at the same moment: far fewer
requests than an A/B split are needed to tell which ranks better (Radlinski et al., 2008).

All functions are pure; the server (serving/service.py, KAIROS_EXPERIMENT_MODE=interleave) logs
the team of every shown slot in the impression log, and `interleaving_winner` reads it back.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import binomtest

TEAM_A, TEAM_B = "champion", "challenger"


def team_draft(list_a: Sequence[str], list_b: Sequence[str], n: int, rng: np.random.Generator,
               team_a: str = TEAM_A, team_b: str = TEAM_B) -> tuple[list[str], list[str]]:
    """Merged list of up to n distinct items and the team that placed each slot.

    The team with fewer picks goes next; on a tie a coin flip (from `rng`) decides. A team whose
    list is exhausted passes; the other keeps picking.
    """
    merged: list[str] = []
    teams: list[str] = []
    seen: set[str] = set()
    ia = ib = 0
    count = {team_a: 0, team_b: 0}
    while len(merged) < n:
        rest_a = [i for i in list_a[ia:] if i not in seen]
        rest_b = [i for i in list_b[ib:] if i not in seen]
        if not rest_a and not rest_b:
            break
        a_turn = count[team_a] < count[team_b] or (count[team_a] == count[team_b] and rng.random() < 0.5)
        if a_turn and not rest_a:
            a_turn = False
        elif not a_turn and not rest_b:
            a_turn = True
        if a_turn:
            while list_a[ia] in seen:
                ia += 1
            item, team = list_a[ia], team_a
        else:
            while list_b[ib] in seen:
                ib += 1
            item, team = list_b[ib], team_b
        merged.append(item)
        teams.append(team)
        seen.add(item)
        count[team] += 1
    return merged, teams


def interleave_answers(answer_a: Mapping[str, Any], answer_b: Mapping[str, Any], n: int, rng: np.random.Generator,
                       record_a: Mapping[str, Any] | None = None, record_b: Mapping[str, Any] | None = None,
                       team_a: str = TEAM_A, team_b: str = TEAM_B) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One answer from two personalize() answers (team-draft), and its impression record with the team
    of every slot; each item keeps its own model's score, propensity and logged feature values."""
    items_a = {it["item_id"]: it for it in answer_a.get("ranked_items", [])}
    items_b = {it["item_id"]: it for it in answer_b.get("ranked_items", [])}
    merged, teams = team_draft(list(items_a), list(items_b), n, rng, team_a, team_b)
    ranked = []
    for rank, (item, team) in enumerate(zip(merged, teams), start=1):
        src = items_a[item] if team == team_a else items_b[item]
        ranked.append({**src, "rank": rank, "team": team})
    answer = {**answer_a, "ranked_items": ranked,
              "model_version": f"{answer_a.get('model_version')}+{answer_b.get('model_version')}",
              "interleaving": {team_a: answer_a.get("model_version"), team_b: answer_b.get("model_version")}}
    if answer_a.get("served_by") != answer_b.get("served_by"):
        answer["served_by"] = f"{answer_a.get('served_by')}|{answer_b.get('served_by')}"
    lat_a, lat_b = answer_a.get("latency_breakdown_ms") or {}, answer_b.get("latency_breakdown_ms") or {}
    answer["latency_breakdown_ms"] = {k: round(float(lat_a.get(k, 0.0)) + float(lat_b.get(k, 0.0)), 3)
                                      for k in set(lat_a) | set(lat_b)}
    record = None
    if record_a is not None:
        feats_b = dict((record_b or {}).get("features") or {})
        feats = {**feats_b, **dict(record_a.get("features") or {})}
        shown = set(merged)
        record = {**record_a, "model_version": answer["model_version"], "served_by": answer["served_by"],
                  "latency_ms": answer["latency_breakdown_ms"].get("total"),
                  "items": [{"item_id": it["item_id"], "position": it["rank"] - 1, "score": float(it["score"]),
                             "propensity": float(it.get("propensity", 1.0)), "team": it["team"]} for it in ranked],
                  "features": {k: v for k, v in feats.items() if k in shown}}
    return answer, record


def attribute_clicks(impressions: pd.DataFrame, clicks: pd.DataFrame, window_ms: int) -> pd.DataFrame:
    """`impressions` with a `clicked` column: a click credits the latest impression of the same
    (user, item) at or before it, if at most `window_ms` earlier (one credit per impression row)."""
    out = impressions.copy()
    out["clicked"] = False
    if out.empty or clicks is None or clicks.empty:
        return out
    imp = out.reset_index().rename(columns={"index": "_row"})[["_row", "user_id", "item_id", "request_ts"]]
    clk = clicks[["user_id", "item_id", "timestamp"]].dropna().copy()
    imp["request_ts"] = imp["request_ts"].astype("int64")
    clk["timestamp"] = clk["timestamp"].astype("int64")
    imp = imp.sort_values("request_ts", kind="mergesort")
    clk = clk.sort_values("timestamp", kind="mergesort")
    matched = pd.merge_asof(clk, imp, left_on="timestamp", right_on="request_ts", by=["user_id", "item_id"],
                            direction="backward", tolerance=int(window_ms))
    rows = matched["_row"].dropna().astype(int).unique()
    out.loc[out.index[rows], "clicked"] = True
    return out


def interleaving_winner(impressions: pd.DataFrame, clicks: pd.DataFrame | None = None, window_ms: int = 3_600_000,
                        team_a: str = TEAM_A, team_b: str = TEAM_B) -> dict[str, Any]:
    """Per request, the team whose slots got more clicks wins; the answer counts wins, ties, the
    preference delta (wins_b - wins_a) / requests with clicks, and a two-sided sign-test p-value.

    `impressions`: rows with request_id, user_id, item_id, request_ts, team (and `clicked` if
    `clicks` is None); `clicks`: rows with user_id, item_id, timestamp.
    """
    frame = impressions[impressions["team"].isin([team_a, team_b])]
    if clicks is not None:
        frame = attribute_clicks(frame, clicks, window_ms)
    per = frame.assign(a=(frame["team"] == team_a) & frame["clicked"], b=(frame["team"] == team_b) & frame["clicked"]) \
        .groupby("request_id")[["a", "b"]].sum()
    wins_a = int((per["a"] > per["b"]).sum())
    wins_b = int((per["b"] > per["a"]).sum())
    ties = int(((per["a"] == per["b"]) & (per["a"] > 0)).sum())
    decided = wins_a + wins_b
    # sign test: under no preference each decided request is a fair coin
    p = binomtest(wins_b, decided, 0.5).pvalue if decided else 1.0
    with_clicks = decided + ties
    winner = team_b if wins_b > wins_a else team_a if wins_a > wins_b else "tie"
    return {"requests": int(len(per)), "requests_with_clicks": with_clicks, f"wins_{team_a}": wins_a,
            f"wins_{team_b}": wins_b, "ties": ties, "delta": (wins_b - wins_a) / with_clicks if with_clicks else 0.0,
            "p_value": float(p), "winner": winner}


__all__ = ["TEAM_A", "TEAM_B", "attribute_clicks", "interleave_answers", "interleaving_winner", "team_draft"]
