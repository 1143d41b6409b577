"""The model bundle: everything that serves together, saved and loaded together.

One bundle = user/item towers + item embeddings + FAISS index + LightGBM ranker +
feature schema + popularity fallback + provenance. It is registered in MLflow as
one model version and switched by alias as one unit (DESIGN invariant 4), so the
server can never mix an index from one training run with a ranker from another.

Integrity: `save` records the sha256 of every bundle file in the manifest (`files_sha256`),
and the registry records the manifest's own sha256 as a model-version tag. `load` refuses a
bundle whose files do not match, and a directory outside the registry's download cache
(`KAIROS_HOME/model_cache`) unless the caller opts in (`allow_untrusted_path=True`, training
and tests). No format in a bundle is a pickle: torch weights load with `weights_only=True`,
numpy with `allow_pickle=False`, FAISS and LightGBM read their own binary/text formats.

It lives in models/ (beside the architecture it rebuilds) because training writes it and serving reads it:
serving depends on the exported artifact and this loader, never on training code.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.registry import ranker_feature_names, registry_version
from models.item_similarity import ItemSimilarity

log = logging.getLogger("kairos.bundle")

MANIFEST = "manifest.json"
TOWERS = "two_tower.pt"
ITEM_EMBEDDINGS = "item_embeddings.npy"
ITEM_VOCAB = "item_vocab.json"
USER_VOCAB = "user_vocab.json"
FAISS_INDEX = "faiss.index"
RANKER = "ranker.txt"
POPULARITY = "popularity.json"
FILES_SHA256 = "files_sha256"
CACHE_DIR = "model_cache"  # under KAIROS_HOME: where models.registry downloads registered versions


# manifest key: {"feature": an item popularity feature, "weight": w without a live session, "session_weight": w in
# one} (training.served_eval.fit_popularity_prior)
POPULARITY_PRIOR = "popularity_prior"
SESSION_FEATURE = "session_length"  # > 0: the request comes from a live session
# manifest key: {"weight": w without a live session, "session_weight": w in one} of the user-history item similarity
# fused into the ranker's score (fuse_similarity; fitted like the popularity prior, training.served_eval)
SIMILARITY_PRIOR = "item_similarity_prior"
USER_VECTOR_CACHE = 10_000  # user tower outputs kept per bundle (128 float32 each: ~5 MB)


def prior_weights(prior: dict[str, Any], features: Any) -> np.ndarray | float:
    """Per row: the session weight where the row has a live session, else the home weight. Inside a session
    its own clicks say what comes next (co-visitation, session intent), so a prior gets its own, usually
    smaller, weight; a prior without `session_weight` applies `weight` everywhere."""
    weight = float(prior.get("weight", 0.0) or 0.0)
    if "session_weight" not in prior or SESSION_FEATURE not in features:
        return weight
    live = np.asarray(features[SESSION_FEATURE], dtype=np.float64) > 0  # a frame's column or an array
    return np.where(live, float(prior["session_weight"]), weight)


def fuse_popularity_prior(probabilities: np.ndarray, popularity: np.ndarray, weight: float | np.ndarray) -> np.ndarray:
    """sigmoid(logit(p) + weight * log1p(popularity)): the ranker's odds times popularity ** weight.

    Why: the ranker learns from logged rows (what a user rated or was shown vs sampled items), which says
    little about how much of the *whole catalog's* next engagement goes to what is popular now; on a
    temporal catalog split recent popularity alone beats it. The weight is fitted on the validation
    window's catalog metric (0 = the ranker alone), never on the test window.
    """
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-9, 1 - 1e-9)
    z = np.log(p / (1 - p)) + np.asarray(weight, dtype=np.float64) * np.log1p(np.clip(np.nan_to_num(popularity), 0.0, None))
    return 1.0 / (1.0 + np.exp(-z))


def fuse_similarity(probabilities: np.ndarray, similarity: np.ndarray, weight: float | np.ndarray) -> np.ndarray:
    """sigmoid(logit(p) + weight * s / max(s)): s = each candidate's summed item similarity to the user's history
    (models/item_similarity.py), scaled by the request's best so the weight means the same for short and long
    histories. Why: the ranker sees co-engagement only as 30-day session co-clicks; the SAR baseline's
    whole-window co-engagement by the same user ranks warm users better. 0 = the ranker alone."""
    s = np.clip(np.nan_to_num(np.asarray(similarity, dtype=np.float64)), 0.0, None)
    top = float(s.max()) if s.size else 0.0
    if top <= 0:
        return np.asarray(probabilities, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-9, 1 - 1e-9)
    z = np.log(p / (1 - p)) + np.asarray(weight, dtype=np.float64) * (s / top)
    return 1.0 / (1.0 + np.exp(-z))


class BundleIntegrityError(RuntimeError):
    """A bundle's files do not match its manifest, or it does not come from the registry."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundle_digests(path: Path) -> dict[str, str]:
    """sha256 of every file of a bundle directory except the manifest itself, by relative path."""
    path = Path(path)
    return {p.relative_to(path).as_posix(): file_sha256(p) for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")}


def verify_bundle_files(path: Path, manifest: dict[str, Any]) -> None:
    """Raise BundleIntegrityError unless the directory holds exactly the files the manifest lists, unchanged."""
    expected = manifest.get(FILES_SHA256)
    if not isinstance(expected, dict) or not expected:
        raise BundleIntegrityError(f"bundle at {path} has no '{FILES_SHA256}' in its manifest: it was saved by an "
                                   "older Kairos or edited by hand; retrain and register it again")
    actual = bundle_digests(path)
    changed = sorted(k for k in expected if actual.get(k) != expected[k])
    extra = sorted(set(actual) - set(expected))
    if changed or extra:
        raise BundleIntegrityError(f"bundle at {path} does not match its manifest (changed or missing: {changed}, "
                                   f"unexpected: {extra}); refusing to load it. Delete the folder and let the "
                                   "server download the version from the registry again")


def check_bundle_origin(path: Path, roots: list[Path] | None = None) -> None:
    """Refuse a bundle directory outside the trusted roots (no model files from arbitrary paths).

    Only the caller names what is trusted (models.registry.load_alias passes the registry download cache
    under KAIROS_HOME); without roots nothing is, so this module needs no settings of its own."""
    real = Path(os.path.realpath(path))
    roots = [Path(os.path.realpath(r)) for r in (roots or [])]
    if not any(real == r or r in real.parents for r in roots):
        where = ", ".join(map(str, roots)) or "no trusted root given"
        raise BundleIntegrityError(f"refusing to load a model bundle from {path}: serving loads bundles only from "
                                   f"the MLflow registry cache ({where}); register the bundle "
                                   "and load it with models.registry.load_alias")


@dataclass
class Bundle:
    """A loaded bundle. Built by training (`save`) and read by serving (`load`)."""

    towers: Any  # models.two_tower.TwoTower (torch module, eval mode)
    item_ids: list[str]
    user_ids: list[str]
    item_embeddings: np.ndarray  # float32 [n_items, d], L2-normalized, row i = item_ids[i]
    index: Any  # faiss index over item_embeddings (inner product)
    ranker: Any  # lightgbm.Booster
    popularity: dict[str, list[str]]  # "global" and per-segment lists of item ids, most popular first
    manifest: dict[str, Any] = field(default_factory=dict)
    model_version: str = "unregistered"
    source_path: Path | None = None  # the verified bundle directory it was loaded from (None: built in memory)
    similarity: ItemSimilarity | None = None  # SAR item-item similarity of the training window (None: none saved)

    def __post_init__(self) -> None:
        self.item_row = {iid: i for i, iid in enumerate(self.item_ids)}
        self.user_row = {uid: i for i, uid in enumerate(self.user_ids)}
        self.scorer = None  # a faster predictor of the same trees (serving.compiled_ranker); None: LightGBM
        self.scorer_name = "lightgbm"
        # user tower outputs of this version by (user row, history rows): a user's requests between two of their
        # events ask the tower the same question (the same towers, the same inputs: the same vector)
        self._user_vectors: OrderedDict[tuple[int, tuple[int, ...]], np.ndarray] = OrderedDict()

    @property
    def ranker_file(self) -> Path | None:
        """The exported LightGBM model file this bundle's ranker was read from (verified against the manifest)."""
        return None if self.source_path is None else Path(self.source_path) / RANKER

    @property
    def ranker_sha256(self) -> str | None:
        return (self.manifest.get(FILES_SHA256) or {}).get(RANKER) if self.source_path is not None else None

    def use_scorer(self, predict, name: str) -> None:
        """Serve `predict(X) -> scores` instead of LightGBM's Booster.predict (one reference swap)."""
        self.scorer_name = name
        self.scorer = predict

    # ------------------------------------------------------------------ inference
    def user_vector(self, user_id: str | None, history_item_ids: list[str]) -> np.ndarray:
        """Session-aware user embedding: the user tower over the id and recent items."""
        from models.two_tower import encode_users

        key = (self.user_row.get(user_id or "", -1), tuple(self.item_row[i] for i in history_item_ids if i in self.item_row))
        cached = self._user_vectors.get(key)
        if cached is not None:
            return cached
        vector = encode_users(self.towers, [key[0]], [list(key[1])])[0]
        vector.setflags(write=False)  # shared by the requests that hit it
        cache = self._user_vectors
        cache[key] = vector
        if len(cache) > USER_VECTOR_CACHE:
            try:
                cache.popitem(last=False)  # the oldest entry (a concurrent request may have taken it first)
            except KeyError:
                pass
        return vector

    def item_vectors(self, item_ids: list[str]) -> np.ndarray:
        rows = [self.item_row.get(i, -1) for i in item_ids]
        out = np.zeros((len(rows), self.item_embeddings.shape[1]), dtype=np.float32)
        known = [k for k, r in enumerate(rows) if r >= 0]
        if known:
            out[known] = self.item_embeddings[[rows[k] for k in known]]
        return out

    def retrieve(self, query: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
        """Top-k items by inner product from the FAISS index."""
        scores, idx = self.index.search(np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32), k)
        keep = idx[0] >= 0
        return [self.item_ids[i] for i in idx[0][keep]], scores[0][keep]

    @property
    def ranker_columns(self) -> tuple[str, ...]:
        """The ranker's input columns, in its order (the manifest's, else the registry's)."""
        return tuple(self.manifest.get("ranker_features") or ranker_feature_names())

    def history_similarity(self, history: list[str], candidates: list[str]) -> np.ndarray | None:
        """Per candidate: its summed similarity to the user's history items (None: no artifact or no history)."""
        if self.similarity is None or not history:
            return None
        return self.similarity.affinity(history, candidates)

    def similar_items(self, history: list[str], k: int) -> list[str]:
        """The retrieval channel: the k items most similar to the history (none without the artifact)."""
        return self.similarity.top(history, k) if self.similarity is not None and history else []

    def rank(self, features: pd.DataFrame, similarity: np.ndarray | None = None) -> np.ndarray:
        """Ranker scores for a feature frame in registry order (see features.functions.assemble_features),
        fused with the popularity prior the manifest names (`POPULARITY_PRIOR`; none = the ranker alone) and
        with `similarity` (history_similarity of the same rows) at the `SIMILARITY_PRIOR` weight."""
        return self._score(features[list(self.ranker_columns)].to_numpy(dtype=np.float64), features, similarity)

    def rank_matrix(self, values: np.ndarray, similarity: np.ndarray | None = None) -> np.ndarray:
        """`rank` for a float64 matrix already in `ranker_columns` order (features.functions.feature_matrix): the
        request path's form, with no frame and no reorder; the same scores as `rank` on the same features."""
        return self._score(values, dict(zip(self.ranker_columns, values.T)), similarity)

    def _score(self, values: np.ndarray, features: Any, similarity: np.ndarray | None) -> np.ndarray:
        """The ranker over `values` (ranker_columns order), then the priors over `features` (columns by name)."""
        scorer = self.scorer
        scores = scorer(values) if scorer is not None else self.ranker.predict(values, num_threads=1)
        prior = self.manifest.get(POPULARITY_PRIOR) or {}
        if prior.get("feature") in features:
            weight = prior_weights(prior, features)
            if np.any(weight):
                scores = fuse_popularity_prior(scores, np.asarray(features[prior["feature"]], dtype=np.float64), weight)
        fused = self.manifest.get(SIMILARITY_PRIOR) or {}
        if similarity is not None and fused:
            weight = prior_weights(fused, features)
            if np.any(weight):
                scores = fuse_similarity(scores, similarity, weight)
        return scores

    def popular(self, n: int, segment: str | None = None, region: str | None = None) -> list[str]:
        """Most popular items for a cold user: the (device, region) segment's list, else the device's,
        else the region's, else the global one (a list exists only where the segment had training clicks)."""
        keys = ([f"{segment}|{region}"] if segment and region else []) + ([segment] if segment else []) \
            + ([f"region:{region}"] if region else []) + ["global"]
        for key in keys:
            ranked = self.popularity.get(key)
            if ranked:
                return ranked[:n]
        return []

    # ------------------------------------------------------------------ persistence
    def save(self, path: Path) -> Path:
        import faiss
        import torch

        path.mkdir(parents=True, exist_ok=True)
        torch.save({"config": self.towers.config, "state_dict": self.towers.state_dict()}, path / TOWERS)
        np.save(path / ITEM_EMBEDDINGS, self.item_embeddings.astype(np.float32))
        (path / ITEM_VOCAB).write_text(json.dumps(self.item_ids))
        (path / USER_VOCAB).write_text(json.dumps(self.user_ids))
        faiss.write_index(self.index, str(path / FAISS_INDEX))
        self.ranker.save_model(str(path / RANKER))
        (path / POPULARITY).write_text(json.dumps(self.popularity))
        if self.similarity is not None:
            self.similarity.save(path)
        manifest = {
            "feature_registry_version": registry_version(),
            "ranker_features": ranker_feature_names(),
            "embedding_dim": int(self.item_embeddings.shape[1]),
            "n_items": len(self.item_ids),
            "n_users": len(self.user_ids),
            **self.manifest,
            FILES_SHA256: bundle_digests(path),  # after every file is written; the manifest itself is not listed
        }
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        return path

    @classmethod
    def load(cls, path: Path, model_version: str = "unregistered", allow_untrusted_path: bool = False,
             manifest_sha256: str | None = None, trusted_roots: list[Path] | None = None) -> "Bundle":
        """Load a saved bundle after checking where it comes from and that its files are intact.

        `manifest_sha256` (the registry's tag) pins the manifest too, so a bundle cannot be
        re-signed by rewriting its manifest. `allow_untrusted_path` skips only the origin check
        (training round trips, tests); the file digests are always verified.
        """
        import faiss
        import lightgbm as lgb
        import torch

        from models.two_tower import TwoTower

        path = Path(path)
        if not allow_untrusted_path:
            check_bundle_origin(path, trusted_roots)
        if not (path / MANIFEST).exists():
            raise BundleIntegrityError(f"no {MANIFEST} in {path}: not a Kairos bundle")
        if manifest_sha256 is not None and file_sha256(path / MANIFEST) != manifest_sha256:
            raise BundleIntegrityError(f"the manifest at {path} differs from the one registered (sha256 "
                                       f"{manifest_sha256[:12]}…); refusing to load it. Delete the folder so the "
                                       "version is downloaded from the registry again")
        manifest = json.loads((path / MANIFEST).read_text())
        verify_bundle_files(path, manifest)
        if manifest.get("feature_registry_version") != registry_version():
            log.warning("bundle was trained with feature registry %s, this code has %s",
                        manifest.get("feature_registry_version"), registry_version())
        blob = torch.load(path / TOWERS, map_location="cpu", weights_only=True)
        towers = TwoTower(**blob["config"])
        towers.load_state_dict(blob["state_dict"])
        towers.eval()
        return cls(
            towers=towers,
            item_ids=json.loads((path / ITEM_VOCAB).read_text()),
            user_ids=json.loads((path / USER_VOCAB).read_text()),
            item_embeddings=np.load(path / ITEM_EMBEDDINGS, allow_pickle=False),
            index=faiss.read_index(str(path / FAISS_INDEX)),
            ranker=lgb.Booster(model_file=str(path / RANKER)),
            popularity=json.loads((path / POPULARITY).read_text()),
            manifest=manifest,
            model_version=model_version,
            source_path=path,
            similarity=ItemSimilarity.load(path),
        )
