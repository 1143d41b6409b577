"""The rollout state as the server reads it: which stage a version is in (registered-model tag + aliases).

The server only reads this (serving/experiments.py turns it into a serving plan), so the state and its
parser live here, where serving may import them; the decisions and alias flips (shadow -> canary ->
promote, rollback) stay in training/rollout.py, which writes the same tag.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from models.registry import CHAMPION, mlflow_client

CANARY = "canary"
PREVIOUS_CHAMPION = "previous_champion"

STATE_TAG = "rollout.state"

NONE, SHADOW, CANARY_STAGE, PROMOTED, ROLLED_BACK, REFUSED = "none", "shadow", "canary", "promoted", "rolled_back", "refused"
STAGES = (NONE, SHADOW, CANARY_STAGE, PROMOTED, ROLLED_BACK, REFUSED)


# ---------------------------------------------------------------------------------------------- state
@dataclass(frozen=True)
class RolloutState:
    """Where the rollout stands, as read from the registry (aliases + registered-model tags)."""

    stage: str = NONE
    version: str | None = None
    canary_share: float = 0.0
    reason: str = ""
    stage_started_ms: int = 0
    aliases: Mapping[str, str] = field(default_factory=dict)

    @property
    def champion(self) -> str | None:
        return self.aliases.get(CHAMPION)

    @property
    def previous_champion(self) -> str | None:
        return self.aliases.get(PREVIOUS_CHAMPION)

    @classmethod
    def from_registry(cls, tags: Mapping[str, str], aliases: Mapping[str, str]) -> "RolloutState":
        """Parse the registered model's `rollout.state` tag; a missing or unreadable one means 'no rollout'."""
        try:
            raw = json.loads(tags.get(STATE_TAG) or "{}")
            stage = str(raw.get("stage", NONE))
            share = float(raw.get("canary_share", 0.0))
            started = int(raw.get("stage_started_ms", 0))
        except (ValueError, TypeError, AttributeError):
            raw, stage, share, started = {}, NONE, 0.0, 0
        return cls(stage=stage if stage in STAGES else NONE, version=str(raw.get("version") or "") or None,
                   canary_share=min(max(share, 0.0), 1.0), reason=str(raw.get("reason", "")),
                   stage_started_ms=started, aliases={str(k): str(v) for k, v in aliases.items()})


def canary_experiment_name(version: str | None) -> str:
    """The experiment name a canary's requests are logged under (and hashed by): one per version."""
    return f"canary-v{version}"


def rollout_state(settings: Any) -> RolloutState:
    """One registry read: the registered model's tags and aliases (a fresh registry: no rollout)."""
    from mlflow.exceptions import MlflowException

    try:
        rm = mlflow_client(settings).get_registered_model(settings.model_name)
    except MlflowException:
        return RolloutState()
    return RolloutState.from_registry(dict(rm.tags or {}), dict(rm.aliases or {}))
