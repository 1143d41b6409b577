"""The FAISS index over item embeddings (inner product on L2-normalized vectors = cosine)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import faiss

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 256


def build_faiss_index(embeddings: np.ndarray, kind: str = "hnsw", m: int = HNSW_M,
                      ef_search: int = HNSW_EF_SEARCH, ef_construction: int = HNSW_EF_CONSTRUCTION) -> faiss.Index:
    """IndexHNSWFlat (METRIC_INNER_PRODUCT, M=32, efSearch>=128) or, with kind="flat", exact IndexFlatIP."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-d, got shape {x.shape}")
    d = x.shape[1]
    index: faiss.Index
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = ef_construction
        hnsw.hnsw.efSearch = max(128, ef_search)
        index = hnsw
    else:
        raise ValueError(f"unknown index kind {kind!r} (expected 'hnsw' or 'flat')")
    if len(x):
        index.add(x)
    return index


def index_recall_at_k(index, embeddings: np.ndarray, queries: np.ndarray, k: int = 100) -> float:
    """Mean share of the exact top-k (brute-force inner product) that the index returns."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    k = int(min(k, len(x)))
    if k <= 0 or len(q) == 0:
        return float("nan")
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, truth = exact.search(q, k)
    _, got = index.search(q, k)
    hits = sum(len(set(t[t >= 0].tolist()) & set(g[g >= 0].tolist())) for t, g in zip(truth, got))
    return hits / float(len(q) * k)
