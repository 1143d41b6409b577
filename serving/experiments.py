"""Online experiments: deterministic champion/challenger assignment, shadow scoring, canary, interleaving.

    KAIROS_EXPERIMENT="ranker-v2:0.10"   10% of users (by hash of experiment and user) get the challenger
    KAIROS_EXPERIMENT_MODE=interleave     ... and those users get a team-draft interleaving of champion and
                                          challenger (serving/interleaving.py) instead of the challenger alone
    KAIROS_SHADOW=1                       the challenger also scores every champion request, logged, never shown
    KAIROS_CANARY_SHARE=0.2               overrides the canary share the registry's rollout state sets

The variables are read once, by `serving.settings.ServeSettings.from_env` (its `experiment`, `shadow` and
`canary_share`), when the service starts. Without env settings the registry's rollout state (models/rollout.py, written by training/rollout.py)
drives the server: stage `shadow` scores the challenger in shadow, stage `canary` sends
`rollout.canary_share` of users (by hash bucket of experiment "canary-v<version>") to the `canary`
alias. Env settings always win.

Assignment is a pure function of (experiment name, user id): the same user always lands
in the same arm across requests, servers and restarts, and renaming the experiment
reshuffles everyone. Shadow answers go to the impression log flagged `shadow` with the
request they shadow, so challenger and champion can be compared offline on identical traffic.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Mapping

CHAMPION_ARM = "champion"
CHALLENGER_ARM = "challenger"
CANARY_ARM = "canary"
INTERLEAVE_ARM = "interleave"
SPLIT, INTERLEAVE = "split", "interleave"


@dataclass(frozen=True)
class Experiment:
    name: str
    challenger_share: float  # 0..1
    treatment_arm: str = CHALLENGER_ARM  # the arm name users in the share get (canary: "canary")
    mode: str = SPLIT  # split: the treatment alone; interleave: team-draft of champion and treatment

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Experiment | None":
        """`KAIROS_EXPERIMENT=name:share`; None when unset. A malformed value is an error, not a silent default."""
        raw = env.get("KAIROS_EXPERIMENT", "").strip()
        if not raw:
            return None
        name, _, share = raw.partition(":")
        try:
            value = float(share)
        except ValueError as exc:
            raise ValueError(f"KAIROS_EXPERIMENT must look like 'name:0.1', got {raw!r}") from exc
        if not name or not 0.0 <= value <= 1.0:
            raise ValueError(f"KAIROS_EXPERIMENT must look like 'name:0.1' with a share in [0, 1], got {raw!r}")
        mode = env.get("KAIROS_EXPERIMENT_MODE", SPLIT).strip().lower() or SPLIT
        if mode not in (SPLIT, INTERLEAVE):
            raise ValueError(f"KAIROS_EXPERIMENT_MODE must be '{SPLIT}' or '{INTERLEAVE}', got {mode!r}")
        return cls(name, value, mode=mode)


def bucket(experiment: str, user_id: str) -> float:
    """A stable number in [0, 1) for (experiment, user)."""
    digest = hashlib.sha256(f"{experiment}\x1f{user_id}".encode()).hexdigest()
    return int(digest[:15], 16) / float(16 ** 15)


def assign(experiment: Experiment | None, user_id: str) -> str:
    if experiment is None or experiment.challenger_share <= 0:
        return CHAMPION_ARM
    return experiment.treatment_arm if bucket(experiment.name, user_id) < experiment.challenger_share else CHAMPION_ARM


@dataclass(frozen=True)
class ServingPlan:
    """What a server does with the candidate model: which alias it loads, who gets it, shadow or not."""

    experiment: Experiment | None
    shadow: bool
    candidate_alias: str  # "challenger" (env experiments, shadow stage) or "canary"
    source: str  # "env" | "registry" | "none"

    @property
    def needs_candidate(self) -> bool:
        return self.experiment is not None or self.shadow


def serving_plan(env_experiment: Experiment | None, env_shadow: bool, rollout: object | None,
                 env_canary_share: float | None = None) -> ServingPlan:
    """Env settings win; else the registry's rollout stage decides (shadow, or a canary share by hash bucket).

    `rollout` is a models.rollout.RolloutState (anything with stage, version, canary_share).
    """
    if env_experiment is not None:
        return ServingPlan(env_experiment, env_shadow, CHALLENGER_ARM, "env")
    stage = getattr(rollout, "stage", None)
    version = getattr(rollout, "version", None)
    if stage == "canary" and version:
        share = env_canary_share if env_canary_share is not None else float(getattr(rollout, "canary_share", 0.0))
        return ServingPlan(Experiment(f"canary-v{version}", share, treatment_arm=CANARY_ARM), env_shadow, CANARY_ARM,
                           "registry")
    if stage == "shadow" and version:
        return ServingPlan(None, True, CHALLENGER_ARM, "registry")
    return ServingPlan(None, env_shadow, CHALLENGER_ARM, "env" if env_shadow else "none")


__all__ = ["CANARY_ARM", "CHALLENGER_ARM", "CHAMPION_ARM", "INTERLEAVE", "INTERLEAVE_ARM", "SPLIT", "Experiment",
           "ServingPlan", "assign", "bucket", "serving_plan"]
