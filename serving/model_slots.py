"""The ranking server's models: the champion, the candidate of an experiment or shadow, the serving plan from the
registry's rollout stage, and the thread that re-reads them (mixed into serving.service.KairosRanker)."""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from ground.settings import Settings
from serving.settings import ServeSettings

if TYPE_CHECKING:
    from features.online import OnlineStore
    from models.bundle import Bundle
    from serving.experiments import Experiment, ServingPlan

log = logging.getLogger("kairos.service")


class ModelSlots:
    """Which bundles a server answers with, and keeping them current: one reference swap per change, so a request
    sees the old or the new bundle, never a mix."""

    settings: Settings
    serve: ServeSettings
    bundle: Bundle | None
    challenger: Bundle | None
    _previous: Bundle | None
    store: OnlineStore | None
    plan: ServingPlan | None
    experiment: Experiment | None
    shadow: Any
    _env_experiment: Experiment | None
    _env_shadow: Any
    _env_canary_share: Any
    _stop: threading.Event

    def _load_champion(self, wanted: str | None = None) -> None:
        """Serve the champion alias (`wanted`: its version when the caller has just read it)."""
        from models.registry import alias_version, load_alias

        try:
            previous = self._previous
            bundle: Bundle | None
            wanted = wanted if wanted is not None else alias_version(self.settings, "champion")
            if previous is not None and wanted is not None and str(previous.model_version) == str(wanted):
                bundle = previous  # a rollback to the version served before: no download, no load
            else:
                bundle = load_alias(self.settings, alias="champion")
        except Exception as exc:  # noqa: BLE001 - registry down or empty: keep serving what we have
            log.warning("could not load the champion: %s", exc)
            return
        if bundle is None:
            if self.bundle is None:
                log.warning("no champion registered yet; serving popularity until one appears")
            return
        if bundle is not previous:
            self._compile_ranker(bundle)
        old = getattr(self.bundle, "model_version", None)
        if self.bundle is not None and str(old) != str(bundle.model_version):
            self._previous = self.bundle
        self.bundle = bundle  # one reference swap: requests see the old or the new bundle, never a mix
        log.info("serving model version %s (was %s)", bundle.model_version, old)

    def _compile_ranker(self, bundle) -> None:
        """Compile the version's exported ranker file once (serving.compiled_ranker; cached on disk for the other
        workers and restarts) in a background thread; LightGBM serves until it is ready or if it cannot be."""
        from serving.compiled_ranker import CACHE_DIRNAME, attach

        try:
            attach(bundle, self.settings.home / CACHE_DIRNAME, background=True, enabled=self.serve.compiled_ranker)
        except Exception as exc:  # noqa: BLE001 - LightGBM serves
            log.warning("ranker compilation not started: %s", exc)

    def _apply_rollout(self, state: Any = None) -> None:
        """Env experiment/shadow settings win; else the registry's rollout stage (shadow, canary share); `state`:
        a RolloutState the caller has just read."""
        from models.rollout import rollout_state
        from serving.experiments import serving_plan

        if self._env_experiment is not None:
            state = None
        elif state is None:
            try:
                state = rollout_state(self.settings)
            except Exception as exc:  # noqa: BLE001 - registry unreachable: keep the current plan
                log.warning("could not read the rollout state: %s", exc)
                return
        plan = serving_plan(self._env_experiment, self._env_shadow, state, self._env_canary_share)
        if plan != self.plan:
            log.info("serving plan: experiment %s, shadow %s, candidate alias %s (from %s)", plan.experiment,
                     plan.shadow, plan.candidate_alias, plan.source)
        self.plan, self.experiment, self.shadow = plan, plan.experiment, plan.shadow

    def _load_challenger(self) -> None:
        """The candidate alias (`challenger`, or `canary` in a canary), when an experiment or shadow mode
        needs it and it differs from the champion."""
        if self.plan is None or not self.plan.needs_candidate:
            self.challenger = None
            return
        from models.registry import alias_version, load_alias

        alias = self.plan.candidate_alias
        try:
            version = alias_version(self.settings, alias)
            champion = getattr(self.bundle, "model_version", None)
            if version is None or str(version) == str(champion):
                self.challenger = None
                return
            if str(getattr(self.challenger, "model_version", "")) != str(version):
                self.challenger = load_alias(self.settings, alias=alias)
                if self.challenger is not None:
                    self._compile_ranker(self.challenger)
                log.info("challenger model version %s loaded (experiment %s, shadow %s)", version,
                         self.experiment, self.shadow)
        except Exception as exc:  # noqa: BLE001 - no challenger: everyone gets the champion
            log.warning("could not load the challenger: %s", exc)

    def _champion_version(self) -> str | None:
        from models.registry import alias_version

        v = alias_version(self.settings, "champion")
        return None if v is None else str(v)

    def _warm_store(self) -> None:
        if self.store is None:
            return
        try:
            self.store.warm()
        except Exception as exc:  # noqa: BLE001
            log.warning("could not warm the online store: %s", exc)

    def _refresh_once(self) -> None:
        """One registry read (the registered model: its aliases and rollout tags) per poll; the champion or the
        challenger is loaded only when its alias points at another version than the one served."""
        from models.rollout import rollout_state

        state = rollout_state(self.settings)
        current = getattr(self.bundle, "model_version", None)
        latest = state.champion
        if latest is not None and latest != (None if current is None else str(current)):
            self._load_champion(latest)
        self._apply_rollout(state)
        plan = self.plan
        if plan is None or not plan.needs_candidate:
            self.challenger = None
            return
        wanted = state.aliases.get(plan.candidate_alias)
        champion = str(getattr(self.bundle, "model_version", None))
        served = None if self.challenger is None else str(self.challenger.model_version)
        if (wanted is None or wanted == champion) and served is None:
            return  # no challenger to serve, none served
        if wanted is not None and wanted == served and wanted != champion:
            return  # the challenger served is the one the alias points at
        self._load_challenger()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.serve.model_poll_s):
            try:
                self._refresh_once()
            except Exception as exc:  # noqa: BLE001
                log.warning("champion check failed: %s", exc)
            self._warm_store()
