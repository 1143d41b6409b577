"""Two-tower retrieval model (PyTorch): a session-aware user tower and an item tower.

User tower: user-id embedding (+1 row for unknown users) concatenated with the mean of
the session's recent items (a separate item-id table with a padding row) -> MLP -> L2.
Item tower: item-id embedding + category embedding -> MLP -> L2.
Trained on positive impressions (label_binary == 1) with an in-batch softmax at a
temperature, with the log-Q correction for in-batch popularity sampling bias.

`encode_users` is what serving calls (via Bundle.user_vector): it is the single
definition of the session-aware user embedding, offline and online.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from features.functions import SESSION_HISTORY_FOR_TOWER

log = logging.getLogger("kairos.two_tower")

UNKNOWN_CATEGORY = "__unknown__"


@dataclass
class TwoTowerConfig:
    dim: int = 64
    epochs: int = 8
    batch_size: int = 512
    lr: float = 0.01
    temperature: float = 0.05
    seed: int = 7
    hidden: int = 128
    weight_decay: float = 1e-6
    logq_correction: bool = True
    # share of training examples whose user id is replaced by "unknown" (trains the cold-start row)
    unknown_user_dropout: float = 0.1
    history_len: int = SESSION_HISTORY_FOR_TOWER
    recall_k: int = 50
    # 1 thread: on 2 shared cores, 2 intra-op threads measured up to 30x slower under contention
    num_threads: int = 1


class TwoTower(nn.Module):
    """Both towers in one module. Construct as `TwoTower(**config)`; `.config` is JSON-serializable."""

    def __init__(self, n_users: int, n_items: int, n_categories: int, dim: int = 64, hidden: int = 128,
                 history_len: int = SESSION_HISTORY_FOR_TOWER) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"n_users": int(n_users), "n_items": int(n_items),
                                       "n_categories": int(n_categories), "dim": int(dim),
                                       "hidden": int(hidden), "history_len": int(history_len)}
        self.n_users, self.n_items, self.dim = int(n_users), int(n_items), int(dim)
        self.history_len = int(history_len)
        # user side: row n_users = unknown user; history items row n_items = padding
        self.user_emb = nn.Embedding(n_users + 1, dim)
        self.hist_emb = nn.Embedding(n_items + 1, dim, padding_idx=n_items)
        self.user_mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        # item side: row n_categories = unknown category
        self.item_emb = nn.Embedding(n_items, dim)
        self.cat_emb = nn.Embedding(n_categories + 1, dim)
        self.item_mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.register_buffer("item_category", torch.full((n_items,), n_categories, dtype=torch.long))
        for emb in (self.user_emb, self.hist_emb, self.item_emb, self.cat_emb):
            nn.init.normal_(emb.weight, std=0.05)
        with torch.no_grad():
            self.hist_emb.weight[n_items].zero_()

    # ------------------------------------------------------------------ towers
    def user_tower(self, user_idx: torch.Tensor, hist_idx: torch.Tensor) -> torch.Tensor:
        """user_idx [B] (n_users = unknown), hist_idx [B, L] (n_items = padding)."""
        u = self.user_emb(user_idx)
        h = self.hist_emb(hist_idx)
        mask = (hist_idx != self.n_items).unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(self.user_mlp(torch.cat([u, pooled], dim=-1)), dim=-1)

    def item_tower(self, item_idx: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.item_emb(item_idx), self.cat_emb(self.item_category[item_idx])], dim=-1)
        return F.normalize(self.item_mlp(x), dim=-1)

    def forward(self, user_idx: torch.Tensor, hist_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        return (self.user_tower(user_idx, hist_idx) * self.item_tower(item_idx)).sum(-1)

    @torch.no_grad()
    def all_item_embeddings(self) -> np.ndarray:
        was_training = self.training
        self.eval()
        out = self.item_tower(torch.arange(self.n_items)).numpy().astype(np.float32)
        self.train(was_training)
        return np.ascontiguousarray(out)


# ---------------------------------------------------------------------- encoding helpers
def pad_histories(history_rows: Sequence[Sequence[int]], n_items: int, length: int) -> np.ndarray:
    """[n, length] int64, most recent first, unknown (<0 or >= n_items) dropped, padded with n_items."""
    out = np.full((len(history_rows), max(length, 1)), n_items, dtype=np.int64)
    for r, hist in enumerate(history_rows):
        kept = [int(i) for i in hist if 0 <= int(i) < n_items][:length]
        if kept:
            out[r, : len(kept)] = kept
    return out


def encode_users(model: TwoTower, user_rows: Sequence[int], history_rows: Sequence[Sequence[int]]) -> np.ndarray:
    """Session-aware user vectors, float32 [n, dim], L2-normalized.

    `user_rows[i]` is the user's row in the vocabulary (-1 or out of range = unknown user);
    `history_rows[i]` lists item rows, most recent first (may be empty).
    """
    n_users, n_items = model.n_users, model.n_items
    users = np.asarray(list(user_rows), dtype=np.int64).reshape(-1)
    users = np.where((users < 0) | (users >= n_users), n_users, users)
    hist = pad_histories(history_rows, n_items, model.history_len)
    with torch.no_grad():
        vec = model.user_tower(torch.from_numpy(users), torch.from_numpy(hist))
    return np.ascontiguousarray(vec.numpy().astype(np.float32))


@lru_cache(maxsize=100_000)
def _parse_history(raw: str) -> tuple[str, ...]:
    try:
        val = json.loads(raw)
    except (TypeError, ValueError):
        return ()
    return tuple(str(v) for v in val) if isinstance(val, list) else ()


def parse_history(raw: Any) -> tuple[str, ...]:
    """session_last_items (JSON list string, list, or null) -> tuple of item ids."""
    if raw is None or (isinstance(raw, float) and np.isnan(raw)):
        return ()
    if isinstance(raw, str):
        return _parse_history(raw)
    if isinstance(raw, (list, tuple, np.ndarray)):
        return tuple(str(v) for v in raw)
    return ()


def _key(value: Any) -> str:
    """Vocabulary key: ids are strings; ints (e.g. MovieLens) are matched by their text; nulls match nothing."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "\0"
    return str(value)


# ---------------------------------------------------------------------- result
@dataclass
class TwoTowerResult:
    model: TwoTower  # eval mode
    item_ids: list[str]
    user_ids: list[str]
    item_embeddings: np.ndarray  # float32 [n_items, dim], L2-normalized
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.item_row = {iid: i for i, iid in enumerate(self.item_ids)}
        self.user_row = {uid: i for i, uid in enumerate(self.user_ids)}

    def __setstate__(self, state: dict[str, Any]) -> None:  # pickles stay small and rebuild the maps
        self.__dict__.update(state)
        if "item_row" not in state:
            self.__post_init__()

    def user_vectors(self, user_ids: Sequence[Any], histories: Sequence[Any], batch: int = 8192) -> np.ndarray:
        """User vectors for raw user ids and raw histories (JSON strings or lists of item ids)."""
        urows = [self.user_row.get(_key(u), -1) for u in user_ids]
        hrows = [[self.item_row[i] for i in parse_history(h) if i in self.item_row] for h in histories]
        out = np.zeros((len(urows), self.item_embeddings.shape[1]), dtype=np.float32)
        for s in range(0, len(urows), batch):
            out[s: s + batch] = encode_users(self.model, urows[s: s + batch], hrows[s: s + batch])
        return out

    def item_rows(self, item_ids: Sequence[Any]) -> np.ndarray:
        return np.array([self.item_row.get(_key(i), -1) for i in item_ids], dtype=np.int64)


# ---------------------------------------------------------------------- training
def _vocab(items: pd.DataFrame, users: pd.DataFrame, rows: pd.DataFrame) -> tuple[list[str], list[str], list[str], dict[str, str]]:
    item_ids = list(dict.fromkeys(items["item_id"].astype(str).tolist()))
    known = set(item_ids)
    extra = sorted({str(i) for i in rows["item_id"].dropna().unique()} - known)
    item_ids += extra
    user_ids = list(dict.fromkeys(users["user_id"].astype(str).tolist()))
    known_u = set(user_ids)
    user_ids += sorted({str(u) for u in rows["user_id"].dropna().unique()} - known_u)
    cat_of = dict(zip(items["item_id"].astype(str), items["category"].astype(str)))
    if "category" in rows:
        for iid, cat in zip(rows["item_id"].astype(str), rows["category"]):
            if iid not in cat_of and isinstance(cat, str):
                cat_of[iid] = cat
    categories = sorted(set(cat_of.values()))
    return item_ids, user_ids, categories, cat_of


def _examples(rows: pd.DataFrame, user_row: dict[str, int], item_row: dict[str, int], n_users: int,
              n_items: int, history_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = rows[rows["label_binary"] == 1]
    items = np.array([item_row.get(i, -1) for i in pos["item_id"].astype(str)], dtype=np.int64)
    keep = items >= 0
    pos, items = pos[keep], items[keep]
    users = np.array([user_row.get(u, n_users) for u in pos["user_id"].astype(str)], dtype=np.int64)
    hist_col = pos["session_last_items"] if "session_last_items" in pos else pd.Series([None] * len(pos))
    hists = [[item_row[i] for i in parse_history(h) if i in item_row] for h in hist_col]
    return users, pad_histories(hists, n_items, history_len), items


@torch.no_grad()
def recall_at_k(model: TwoTower, item_embeddings: np.ndarray, users: np.ndarray, hist: np.ndarray,
                items: np.ndarray, k: int) -> float:
    """Share of positives whose item is in the user's top-k by inner product over the whole catalog."""
    if len(items) == 0:
        return float("nan")
    k = min(k, item_embeddings.shape[0])
    emb = torch.from_numpy(item_embeddings)
    hits = 0
    for s in range(0, len(items), 4096):
        u = model.user_tower(torch.from_numpy(users[s: s + 4096]), torch.from_numpy(hist[s: s + 4096]))
        scores = u @ emb.T
        target = scores.gather(1, torch.from_numpy(items[s: s + 4096]).unsqueeze(1))
        # rank = number of items scoring strictly higher (ties count in the model's favour)
        rank = (scores > target).sum(1)
        hits += int((rank < k).sum())
    return hits / len(items)


def train_two_tower(train_rows: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame,
                    config: TwoTowerConfig | None = None, valid_rows: pd.DataFrame | None = None) -> TwoTowerResult:
    """Train both towers on the positive impressions of `train_rows`; report validation recall@k."""
    config = config or TwoTowerConfig()
    t0 = time.perf_counter()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(config.num_threads)
    try:
        return _train(train_rows, items, users, config, valid_rows, t0)
    finally:
        torch.set_num_threads(prev_threads)


def _train(train_rows: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame, config: TwoTowerConfig,
           valid_rows: pd.DataFrame | None, t0: float) -> TwoTowerResult:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)

    item_ids, user_ids, categories, cat_of = _vocab(items, users, train_rows)
    n_users, n_items = len(user_ids), len(item_ids)
    item_row = {iid: i for i, iid in enumerate(item_ids)}
    user_row = {uid: i for i, uid in enumerate(user_ids)}
    cat_index = {c: k for k, c in enumerate(categories)}

    model = TwoTower(n_users, n_items, len(categories), dim=config.dim, hidden=config.hidden,
                     history_len=config.history_len)
    with torch.no_grad():
        model.item_category.copy_(torch.tensor([cat_index.get(cat_of.get(i, ""), len(categories)) for i in item_ids],
                                               dtype=torch.long))

    users_t, hist_t, items_t = _examples(train_rows, user_row, item_row, n_users, n_items, config.history_len)
    n = len(items_t)
    if n == 0:
        raise ValueError("no positive training rows (label_binary == 1) for the two-tower model")
    # log-Q: the chance an item shows up as an in-batch negative is proportional to its positive count
    counts = np.bincount(items_t, minlength=n_items).astype(np.float64)
    log_q = torch.from_numpy(np.log((counts + 1.0) / (counts.sum() + n_items)).astype(np.float32))

    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    bs = max(2, int(config.batch_size))
    losses: list[float] = []
    model.train()
    for epoch in range(config.epochs):
        perm = rng.permutation(n)
        epoch_loss, batches = 0.0, 0
        for s in range(0, n, bs):
            idx = perm[s: s + bs]
            if len(idx) < 2:
                continue
            u = users_t[idx].copy()
            if config.unknown_user_dropout > 0:
                u[rng.random(len(idx)) < config.unknown_user_dropout] = n_users
            it = torch.from_numpy(items_t[idx])
            uv = model.user_tower(torch.from_numpy(u), torch.from_numpy(hist_t[idx]))
            iv = model.item_tower(it)
            logits = uv @ iv.T / config.temperature
            if config.logq_correction:
                logits = logits - log_q[it].unsqueeze(0)
            # the same item twice in a batch is not a negative for itself
            same = it.unsqueeze(0) == it.unsqueeze(1)
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, float("-inf"))
            loss = F.cross_entropy(logits, torch.arange(len(idx)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            epoch_loss += float(loss.detach())
            batches += 1
        losses.append(epoch_loss / max(batches, 1))
    model.eval()
    emb = model.all_item_embeddings()
    metrics: dict[str, float] = {"train_positives": float(n), "final_train_loss": float(losses[-1]) if losses else float("nan"),
                                 "train_seconds": 0.0}
    metrics["random_recall_at_%d" % config.recall_k] = float(min(config.recall_k, n_items) / n_items)
    if valid_rows is not None and len(valid_rows):
        vu, vh, vi = _examples(valid_rows, user_row, item_row, n_users, n_items, config.history_len)
        if len(vi):
            metrics[f"validation_recall_at_{config.recall_k}"] = float(recall_at_k(model, emb, vu, vh, vi, config.recall_k))
            metrics["validation_positives"] = float(len(vi))
    metrics["train_seconds"] = round(time.perf_counter() - t0, 3)
    log.info("two-tower trained: %s", metrics)
    return TwoTowerResult(model=model, item_ids=item_ids, user_ids=user_ids, item_embeddings=emb, metrics=metrics,
                          config=asdict(config))
