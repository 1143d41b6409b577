"""Assemble the bundle from trained parts; or train everything in-process (tests, benchmarks)."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from features.registry import ranker_feature_names, registry_version
from models.bundle import Bundle
from models.item_similarity import ItemSimilarity
from training.index import build_faiss_index, index_recall_at_k
from training.ranker import RankerConfig, fit_ranker
from training.two_tower import TwoTowerResult, train_two_tower
from training.two_tower_config import TwoTowerConfig

log = logging.getLogger("kairos.trainer")


# which splits' positives the SAR similarity counts: the train split while its fused weight is fitted on the
# validation window (so the fit never scores what the artifact saw), then everything before the test window for
# the bundle that is evaluated at the test window's start and registered (the weight chosen, the counts refreshed,
# as the online store's item features are refreshed up to that time)
SIMILARITY_FIT_SPLITS: tuple[str, ...] = ("train",)
SIMILARITY_SERVE_SPLITS: tuple[str, ...] = ("train", "validation")


def item_similarity(frame: pd.DataFrame, splits: tuple[str, ...] = SIMILARITY_FIT_SPLITS) -> ItemSimilarity | None:
    """SAR item-item similarity of the positives of `splits` (models/item_similarity.py); None without any."""
    train = frame[frame["split"].isin(splits)] if "split" in frame else frame
    pos = train[(train["label_binary"] == 1) & train["user_id"].notna() & train["item_id"].notna()]
    if not len(pos):
        return None
    return ItemSimilarity.fit(pos["user_id"].astype(str).tolist(), pos["item_id"].astype(str).tolist())


def popularity_lists(frame: pd.DataFrame, users: pd.DataFrame | None, item_ids: list[str]) -> dict[str, list[str]]:
    """{"global": items by train-split clicks (desc, then every other item), one list per device_type,
    per region ("region:<r>"), per (device, region) ("<device>|<region>", falling back to the device's
    order) and per user segment (each falls back to the global order after its own clicked items)."""
    train = frame[frame["split"] == "train"] if "split" in frame else frame
    clicks = train[train["label_binary"] == 1]
    known = set(item_ids)

    def ranked(sub: pd.DataFrame, tail: list[str]) -> list[str]:
        counts = sub.groupby("item_id").size()
        # deterministic: clicks desc, then item id
        top = sorted(((-int(c), str(i)) for i, c in counts.items() if str(i) in known))
        head = [i for _, i in top]
        seen = set(head)
        return head + [i for i in tail if i not in seen]

    glob = ranked(clicks, list(item_ids))
    out = {"global": glob}
    if "device_type" in clicks:
        for dev in sorted(d for d in frame["device_type"].dropna().unique()):
            out[str(dev)] = ranked(clicks[clicks["device_type"] == dev], glob)
    if users is not None and "geo_region" in users and len(clicks):
        # cold start by (device, region): a mobile user in one region is not a desktop user in another
        region = clicks["user_id"].map(dict(zip(users["user_id"], users["geo_region"])))
        for reg in sorted(r for r in region.dropna().unique()):
            in_region = clicks[region == reg]
            out[f"region:{reg}"] = ranked(in_region, glob)
            if "device_type" in in_region:
                for dev in sorted(d for d in in_region["device_type"].dropna().unique()):
                    out[f"{dev}|{reg}"] = ranked(in_region[in_region["device_type"] == dev], out.get(str(dev), glob))
    if users is not None and "segment" in users and len(clicks):
        seg_of = dict(zip(users["user_id"], users["segment"]))
        seg = clicks["user_id"].map(seg_of)
        for s in sorted(users["segment"].dropna().unique()):
            key = str(s)
            if key in out:
                key = f"segment:{s}"
            out[key] = ranked(clicks[seg == s], glob)
    return out


def assemble_bundle(tt: TwoTowerResult, faiss_index_bytes: bytes, booster: Any, frame: pd.DataFrame,
                    users: pd.DataFrame, manifest: dict | None = None,
                    similarity_splits: tuple[str, ...] = SIMILARITY_FIT_SPLITS) -> Bundle:
    """One Bundle from the trained towers, the serialized FAISS index and the ranker; its item similarity counts
    the positives of `similarity_splits` (SIMILARITY_SERVE_SPLITS for the bundle that is registered)."""
    import faiss

    index = faiss.deserialize_index(np.frombuffer(faiss_index_bytes, dtype=np.uint8)
                                    if isinstance(faiss_index_bytes, (bytes, bytearray)) else faiss_index_bytes)
    if index.ntotal != len(tt.item_ids):
        raise ValueError(f"index holds {index.ntotal} vectors but the towers know {len(tt.item_ids)} items")
    names = booster.feature_name()
    if list(names) != ranker_feature_names():
        raise ValueError(f"ranker features {names} differ from the registry's {ranker_feature_names()}")
    info = {
        "feature_registry_version": registry_version(),
        "ranker_features": ranker_feature_names(),
        "two_tower_config": dict(tt.config),
        "two_tower_metrics": {k: float(v) for k, v in tt.metrics.items()},
        "ranker_best_iteration": int(booster.best_iteration or booster.current_iteration()),
        "index_type": type(index).__name__,
        "training_rows": int(len(frame)),
        "created_at_ms": int(time.time() * 1000),
        **(manifest or {}),
    }
    return Bundle(towers=tt.model, item_ids=list(tt.item_ids), user_ids=list(tt.user_ids),
                  item_embeddings=np.ascontiguousarray(tt.item_embeddings, dtype=np.float32), index=index,
                  ranker=booster, popularity=popularity_lists(frame, users, list(tt.item_ids)), manifest=info,
                  similarity=item_similarity(frame, similarity_splits))


@dataclass
class TrainingOutcome:
    bundle: Bundle
    metrics: dict[str, dict[str, float]]
    params: dict[str, Any]
    two_tower: TwoTowerResult
    booster: Any
    timings: dict[str, float] = field(default_factory=dict)
    index_recall_at_100: float = float("nan")


def train_bundle(training_set: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame,
                 tt_config: TwoTowerConfig = TwoTowerConfig(), ranker_config: RankerConfig = RankerConfig(),
                 manifest: dict | None = None) -> TrainingOutcome:
    """Two-tower -> FAISS -> affinity -> ranker -> evaluation -> bundle, all in this process."""
    import faiss

    from training.evaluation import evaluate_models

    timings: dict[str, float] = {}
    t = time.perf_counter()
    tt = train_two_tower(training_set[training_set["split"] == "train"], items, users, tt_config,
                         valid_rows=training_set[training_set["split"] == "validation"])
    timings["two_tower_s"] = time.perf_counter() - t
    t = time.perf_counter()
    index = build_faiss_index(tt.item_embeddings, kind="hnsw")
    emb = tt.item_embeddings
    rng = np.random.default_rng(0)
    queries = emb[rng.choice(len(emb), size=min(200, len(emb)), replace=False)]
    recall = float(index_recall_at_k(index, emb, queries, k=min(100, len(emb))))
    timings["index_s"] = time.perf_counter() - t
    t = time.perf_counter()
    booster, frame, _ = fit_ranker(training_set, tt, items, users, ranker_config)
    timings["ranker_s"] = time.perf_counter() - t  # the affinity (in sample and out of fold) and both rankers
    t = time.perf_counter()
    metrics = evaluate_models(frame, tt, booster)
    timings["evaluation_s"] = time.perf_counter() - t
    params = {"training_rows": int(len(training_set)),
              **{f"two_tower.{k}": v for k, v in asdict(tt_config).items()},
              **{f"ranker.{k}": v for k, v in asdict(ranker_config).items()},
              "index_recall_at_100": recall}
    bundle = assemble_bundle(tt, faiss.serialize_index(index).tobytes(), booster, frame, users,
                             manifest={"index_recall_at_100": recall, **(manifest or {})})
    return TrainingOutcome(bundle=bundle, metrics=metrics, params=params, two_tower=tt, booster=booster,
                           timings={k: round(v, 3) for k, v in timings.items()}, index_recall_at_100=recall)
