"""SAR item-item similarity (models/item_similarity.py): one implementation for the bundle and the baseline."""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from models.item_similarity import ItemSimilarity, jaccard, top_k_per_row
from training.baselines import CoOccurrence
from training.catalog_eval import temporal_split


def test_jaccard_is_shared_users_over_either_users() -> None:
    # users x items: u0 {a, b}, u1 {a, c}, u2 {b}, u0 engages a twice (counted once)
    m = sp.csr_matrix((np.ones(5), ([0, 0, 1, 1, 2], [0, 1, 0, 2, 1])), shape=(3, 3)) + sp.csr_matrix(([1.0], ([0], [0])), shape=(3, 3))
    sim = jaccard(m).toarray()
    assert np.allclose(sim, [[1.0, 1 / 3, 1 / 2], [1 / 3, 1.0, 0.0], [1 / 2, 0.0, 1.0]])
    top = top_k_per_row(jaccard(m), 2).toarray()
    assert np.allclose(top, [[1.0, 0.0, 1 / 2], [1 / 3, 1.0, 0.0], [1 / 2, 0.0, 1.0]])


def test_history_scores_and_retrieval() -> None:
    s = ItemSimilarity.fit(["u0", "u0", "u1", "u1", "u2"], ["a", "b", "a", "c", "b"], top_k=None)
    assert np.allclose(s.affinity(["a"], ["b", "c", "unknown"]), [1 / 3, 1 / 2, 0.0])
    assert np.allclose(s.affinity(["b", "c"], ["a"]), [1 / 3 + 1 / 2])
    assert s.top(["c"], 5) == ["a"]  # positive scores only: b never met c; c is not its own neighbour
    # an item of the history scores by the other history items only (the Jaccard diagonal left out)
    assert np.allclose(s.affinity(["a", "b"], ["a", "b", "c"]), [1 / 3, 1 / 3, 1 / 2])
    assert s.affinity([], ["a"]).tolist() == [0.0] and s.top(["unknown"], 3) == []


def test_the_sar_baseline_scores_with_the_product_similarity() -> None:
    rng = np.random.default_rng(3)
    n = 400
    frame = pd.DataFrame({"user_id": rng.integers(0, 40, n).astype(str), "item_id": rng.integers(0, 30, n).astype(str),
                          "timestamp": np.sort(rng.integers(0, 10_000, n)), "positive": rng.random(n) < 0.7})
    catalog = [str(i) for i in range(30)]
    split = temporal_split(frame, catalog, split_ms=8_000)
    baseline = CoOccurrence(split)
    train = split.train[split.train["positive"].astype(bool)]
    product = ItemSimilarity.fit(train["user_id"].tolist(), train["item_id"].tolist(), top_k=None)
    order = [product.row[i] for i in catalog if i in product.row]
    known = [i for i, item in enumerate(catalog) if item in product.row]
    assert np.allclose(baseline.similarity.toarray()[np.ix_(known, known)], product.matrix.toarray()[np.ix_(order, order)])
