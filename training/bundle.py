"""The model bundle: everything that serves together, saved and loaded together.

One bundle = user/item towers + item embeddings + FAISS index + LightGBM ranker +
feature schema + popularity fallback + provenance. It is registered in MLflow as
one model version and switched by alias as one unit (DESIGN invariant 4), so the
server can never mix an index from one training run with a ranker from another.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from features.registry import ranker_feature_names, registry_version

log = logging.getLogger("kairos.bundle")

MANIFEST = "manifest.json"
TOWERS = "two_tower.pt"
ITEM_EMBEDDINGS = "item_embeddings.npy"
ITEM_VOCAB = "item_vocab.json"
USER_VOCAB = "user_vocab.json"
FAISS_INDEX = "faiss.index"
RANKER = "ranker.txt"
POPULARITY = "popularity.json"


@dataclass
class Bundle:
    """A loaded bundle. Built by training (`save`) and read by serving (`load`)."""

    towers: Any  # training.two_tower.TwoTower (torch module, eval mode)
    item_ids: list[str]
    user_ids: list[str]
    item_embeddings: np.ndarray  # float32 [n_items, d], L2-normalized, row i = item_ids[i]
    index: Any  # faiss index over item_embeddings (inner product)
    ranker: Any  # lightgbm.Booster
    popularity: dict[str, list[str]]  # "global" and per-segment lists of item ids, most popular first
    manifest: dict[str, Any] = field(default_factory=dict)
    model_version: str = "unregistered"

    def __post_init__(self) -> None:
        self.item_row = {iid: i for i, iid in enumerate(self.item_ids)}
        self.user_row = {uid: i for i, uid in enumerate(self.user_ids)}

    # ------------------------------------------------------------------ inference
    def user_vector(self, user_id: str | None, history_item_ids: list[str]) -> np.ndarray:
        """Session-aware user embedding: the user tower over the id and recent items."""
        from training.two_tower import encode_users

        return encode_users(self.towers, [self.user_row.get(user_id or "", -1)],
                            [[self.item_row[i] for i in history_item_ids if i in self.item_row]])[0]

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

    def rank(self, features: pd.DataFrame) -> np.ndarray:
        """Ranker scores for a feature frame in registry order (see features.functions.assemble_features)."""
        cols = self.manifest.get("ranker_features", ranker_feature_names())
        return self.ranker.predict(features[cols].to_numpy(dtype=np.float64), num_threads=1)

    def popular(self, n: int, segment: str | None = None) -> list[str]:
        ranked = self.popularity.get(segment or "global") or self.popularity.get("global", [])
        return ranked[:n]

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
        manifest = {
            "feature_registry_version": registry_version(),
            "ranker_features": ranker_feature_names(),
            "embedding_dim": int(self.item_embeddings.shape[1]),
            "n_items": len(self.item_ids),
            "n_users": len(self.user_ids),
            **self.manifest,
        }
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        return path

    @classmethod
    def load(cls, path: Path, model_version: str = "unregistered") -> "Bundle":
        import faiss
        import lightgbm as lgb
        import torch

        from training.two_tower import TwoTower

        path = Path(path)
        manifest = json.loads((path / MANIFEST).read_text())
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
            item_embeddings=np.load(path / ITEM_EMBEDDINGS),
            index=faiss.read_index(str(path / FAISS_INDEX)),
            ranker=lgb.Booster(model_file=str(path / RANKER)),
            popularity=json.loads((path / POPULARITY).read_text()),
            manifest=manifest,
            model_version=model_version,
        )
