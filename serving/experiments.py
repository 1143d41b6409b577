"""Online experiments: deterministic champion/challenger assignment and shadow scoring.

    KAIROS_EXPERIMENT="ranker-v2:0.10"   10% of users (by hash of experiment and user) get the challenger
    KAIROS_SHADOW=1                       the challenger also scores every champion request, logged, never shown

Assignment is a pure function of (experiment name, user id): the same user always lands
in the same arm across requests, servers and restarts, and renaming the experiment
reshuffles everyone. Shadow answers go to the impression log flagged `shadow` with the
request they shadow, so challenger and champion can be compared offline on identical traffic.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

CHAMPION_ARM = "champion"
CHALLENGER_ARM = "challenger"


@dataclass(frozen=True)
class Experiment:
    name: str
    challenger_share: float  # 0..1

    @classmethod
    def from_env(cls) -> "Experiment | None":
        """`KAIROS_EXPERIMENT=name:share`; None when unset. A malformed value is an error, not a silent default."""
        raw = os.environ.get("KAIROS_EXPERIMENT", "").strip()
        if not raw:
            return None
        name, _, share = raw.partition(":")
        try:
            value = float(share)
        except ValueError as exc:
            raise ValueError(f"KAIROS_EXPERIMENT must look like 'name:0.1', got {raw!r}") from exc
        if not name or not 0.0 <= value <= 1.0:
            raise ValueError(f"KAIROS_EXPERIMENT must look like 'name:0.1' with a share in [0, 1], got {raw!r}")
        return cls(name, value)


def bucket(experiment: str, user_id: str) -> float:
    """A stable number in [0, 1) for (experiment, user)."""
    digest = hashlib.sha256(f"{experiment}\x1f{user_id}".encode()).hexdigest()
    return int(digest[:15], 16) / float(16 ** 15)


def assign(experiment: Experiment | None, user_id: str) -> str:
    if experiment is None or experiment.challenger_share <= 0:
        return CHAMPION_ARM
    return CHALLENGER_ARM if bucket(experiment.name, user_id) < experiment.challenger_share else CHAMPION_ARM


def shadow_enabled() -> bool:
    return os.environ.get("KAIROS_SHADOW", "0").lower() in ("1", "true", "yes")


__all__ = ["CHALLENGER_ARM", "CHAMPION_ARM", "Experiment", "assign", "bucket", "shadow_enabled"]
