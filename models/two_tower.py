"""The two-tower architecture and its inference: what a bundle rebuilds from its saved weights and runs.

User tower: user-id embedding (+1 row for unknown users, also used for catalog users without
training positives), the mean of the session's recent items (a separate item-id table with a
padding row) and the user's profile (segment and device_type, one embedding per value plus an
unknown row) -> MLP -> L2. Item tower: item-id embedding (masked out for items without training
positives), category embedding, a hashed bag of words over title + tags, log1p popularity and
freshness -> MLP -> L2.

It lives here, not in training/, because serving loads and runs it (Bundle.load, Bundle.user_vector)
and must not import training code; the training loop and losses stay in training/two_tower.py.
`encode_users` is the single definition of the session-aware user embedding, offline and online.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from features.functions import SESSION_HISTORY_FOR_TOWER
from models.two_tower_shape import TEXT_BUCKETS, TEXT_LEN

# architecture versions: 1 = id + history / id + category (bundles saved before content features)
MODEL_VERSION = 2


class TwoTower(nn.Module):
    """Both towers in one module. Construct as `TwoTower(**config)`; `.config` is JSON-serializable.

    `version=1` rebuilds the id/category-only towers of bundles saved before content features.
    """

    # buffers (register_buffer below), declared so a type checker sees tensors, not `Tensor | Module`
    item_category: torch.Tensor
    user_segment: torch.Tensor
    user_device: torch.Tensor
    user_has_id: torch.Tensor
    item_tokens: torch.Tensor
    item_dense: torch.Tensor
    item_has_id: torch.Tensor

    def __init__(self, n_users: int, n_items: int, n_categories: int, dim: int = 128, hidden: int = 128,
                 history_len: int = SESSION_HISTORY_FOR_TOWER, version: int = 1, text_buckets: int = TEXT_BUCKETS,
                 text_len: int = TEXT_LEN, segments: Sequence[str] = (), devices: Sequence[str] = ()) -> None:
        super().__init__()
        self.version = int(version)
        self.config: dict[str, Any] = {"n_users": int(n_users), "n_items": int(n_items),
                                       "n_categories": int(n_categories), "dim": int(dim),
                                       "hidden": int(hidden), "history_len": int(history_len)}
        self.n_users, self.n_items, self.dim = int(n_users), int(n_items), int(dim)
        self.n_categories = int(n_categories)
        self.history_len = int(history_len)
        v2 = self.version >= 2
        if v2:
            self.segments, self.devices = [str(s) for s in segments], [str(d) for d in devices]
            self.text_buckets, self.text_len = int(text_buckets), max(int(text_len), 1)
            self.config.update({"version": self.version, "text_buckets": self.text_buckets,
                                "text_len": self.text_len, "segments": list(self.segments),
                                "devices": list(self.devices)})
        # user side: row n_users = unknown user; history items row n_items = padding
        self.user_emb = nn.Embedding(n_users + 1, dim)
        self.hist_emb = nn.Embedding(n_items + 1, dim, padding_idx=n_items)
        # item side: row n_categories = unknown category
        self.item_emb = nn.Embedding(n_items, dim)
        self.cat_emb = nn.Embedding(n_categories + 1, dim)
        self.register_buffer("item_category", torch.full((n_items,), n_categories, dtype=torch.long))
        embeddings = [self.user_emb, self.hist_emb, self.item_emb, self.cat_emb]
        user_in, item_in = 2 * dim, 2 * dim
        if v2:
            pdim = max(dim // 4, 4)
            # profile: one row per segment / device value, last row = unknown
            self.seg_emb = nn.Embedding(len(self.segments) + 1, pdim)
            self.dev_emb = nn.Embedding(len(self.devices) + 1, pdim)
            # content: hashed tokens (row text_buckets = padding), dense [log1p popularity, freshness]
            self.text_emb = nn.Embedding(self.text_buckets + 1, dim, padding_idx=self.text_buckets)
            embeddings += [self.seg_emb, self.dev_emb, self.text_emb]
            user_in += 2 * pdim
            item_in += dim + 2
            # per-user profile rows (row n_users = unknown user) and whether the id row was trained
            self.register_buffer("user_segment", torch.full((n_users + 1,), len(self.segments), dtype=torch.long))
            self.register_buffer("user_device", torch.full((n_users + 1,), len(self.devices), dtype=torch.long))
            self.register_buffer("user_has_id", torch.zeros(n_users + 1))
            self.register_buffer("item_tokens", torch.full((n_items, self.text_len), self.text_buckets,
                                                           dtype=torch.long))
            self.register_buffer("item_dense", torch.zeros(n_items, 2))
            self.register_buffer("item_has_id", torch.zeros(n_items))
        self.user_mlp = nn.Sequential(nn.Linear(user_in, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.item_mlp = nn.Sequential(nn.Linear(item_in, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        for emb in embeddings:
            nn.init.normal_(emb.weight, std=0.05)
        with torch.no_grad():
            self.hist_emb.weight[n_items].zero_()
            if v2:
                self.text_emb.weight[self.text_buckets].zero_()

    # ------------------------------------------------------------------ towers
    def user_tower(self, user_idx: torch.Tensor, hist_idx: torch.Tensor, segment_idx: torch.Tensor | None = None,
                   device_idx: torch.Tensor | None = None) -> torch.Tensor:
        """user_idx [B] (n_users = unknown), hist_idx [B, L] (n_items = padding).

        segment_idx / device_idx [B] override the catalog profile (len(segments) / len(devices) = unknown);
        by default the profile stored for the user row is used (unknown users: unknown profile).
        """
        h = self.hist_emb(hist_idx)
        mask = (hist_idx != self.n_items).unsqueeze(-1).to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if self.version < 2:
            return F.normalize(self.user_mlp(torch.cat([self.user_emb(user_idx), pooled], dim=-1)), dim=-1)
        # users without training positives share the trained "unknown" id row, keeping their profile
        known = self.user_has_id[user_idx] > 0
        u = self.user_emb(torch.where(known, user_idx, torch.full_like(user_idx, self.n_users)))
        seg = self.user_segment[user_idx] if segment_idx is None else segment_idx
        dev = self.user_device[user_idx] if device_idx is None else device_idx
        x = torch.cat([u, pooled, self.seg_emb(seg), self.dev_emb(dev)], dim=-1)
        return F.normalize(self.user_mlp(x), dim=-1)

    def item_tower(self, item_idx: torch.Tensor, content_only: torch.Tensor | None = None) -> torch.Tensor:
        """item_idx [B]; `content_only` [B] bool forces the cold-start path (no id, no popularity)."""
        ie, ce = self.item_emb(item_idx), self.cat_emb(self.item_category[item_idx])
        if self.version < 2:
            return F.normalize(self.item_mlp(torch.cat([ie, ce], dim=-1)), dim=-1)
        keep = self.item_has_id[item_idx]
        if content_only is not None:
            keep = keep * (~content_only).to(keep.dtype)
        tok = self.item_tokens[item_idx]
        t = self.text_emb(tok)
        tmask = (tok != self.text_buckets).unsqueeze(-1).to(t.dtype)
        text = (t * tmask).sum(1) / tmask.sum(1).clamp(min=1.0)
        dense = self.item_dense[item_idx]
        # popularity is the positive count: zero for an item embedded from content alone
        dense = torch.stack([dense[:, 0] * keep, dense[:, 1]], dim=-1)
        x = torch.cat([ie * keep.unsqueeze(-1), ce, text, dense], dim=-1)
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


def _profile_rows(rows: Sequence[int] | None, n_values: int, n: int) -> torch.Tensor | None:
    if rows is None:
        return None
    arr = np.asarray(list(rows), dtype=np.int64).reshape(-1)
    if len(arr) != n:
        raise ValueError(f"{len(arr)} profile rows for {n} users")
    return torch.from_numpy(np.where((arr < 0) | (arr >= n_values), n_values, arr))


def encode_users(model: TwoTower, user_rows: Sequence[int], history_rows: Sequence[Sequence[int]],
                 segment_rows: Sequence[int] | None = None, device_rows: Sequence[int] | None = None) -> np.ndarray:
    """Session-aware user vectors, float32 [n, dim], L2-normalized.

    `user_rows[i]` is the user's row in the vocabulary (-1 or out of range = unknown user);
    `history_rows[i]` lists item rows, most recent first (may be empty).
    `segment_rows` / `device_rows` (rows of `model.segments` / `model.devices`, -1 = unknown) override
    the profile stored for the user at training time; by default the stored profile is used.
    """
    n_users, n_items = model.n_users, model.n_items
    users = np.asarray(list(user_rows), dtype=np.int64).reshape(-1)
    users = np.where((users < 0) | (users >= n_users), n_users, users)
    hist = pad_histories(history_rows, n_items, model.history_len)
    extra: dict[str, Any] = {}
    if getattr(model, "version", 1) >= 2:
        extra = {"segment_idx": _profile_rows(segment_rows, len(model.segments), len(users)),
                 "device_idx": _profile_rows(device_rows, len(model.devices), len(users))}
    with torch.no_grad():
        vec = model.user_tower(torch.from_numpy(users), torch.from_numpy(hist), **extra)
    return np.ascontiguousarray(vec.numpy().astype(np.float32))
