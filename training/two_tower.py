"""Two-tower retrieval model (PyTorch): a session-aware user tower and a content-aware item tower.

User tower: user-id embedding (+1 row for unknown users, also used for catalog users without
training positives), the mean of the session's recent items (a separate item-id table with a
padding row) and the user's profile (segment and device_type from the users catalog, one
embedding per value plus an unknown row) -> MLP -> L2.
Item tower: item-id embedding (masked out for items without training positives), category
embedding, a hashed bag of words over title + tags (mean of token embeddings), log1p
popularity and freshness -> MLP -> L2. An item never seen in training is embedded from its
content alone, so new catalog items are retrievable on the next bundle.
Trained on positive impressions (label_binary == 1) with an in-batch softmax at a
temperature, with the log-Q correction for in-batch popularity sampling bias; early stopping
on validation recall@k (the best epoch's weights are kept).

The architecture (TwoTower) and the user encoding serving calls (encode_users, via
Bundle.user_vector) live in models/two_tower.py, so serving never imports this training module.
"""
from __future__ import annotations

import json
import logging
import re
import time
import zlib
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from features.functions import tower_history_column
from models.two_tower import MODEL_VERSION, TwoTower, encode_users, pad_histories
from models.two_tower_shape import TEXT_BUCKETS, TEXT_LEN
from training.two_tower_config import TwoTowerConfig

log = logging.getLogger("kairos.two_tower")

UNKNOWN_CATEGORY = "__unknown__"
DAY_MS = 86_400_000
FRESHNESS_MAX_DAYS = 365.0
# recall@k values always reported (the early-stopping k is added to these)
REPORTED_RECALL_KS = (50, 100)
_TOKEN = re.compile(r"[0-9a-z_]+")


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


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        return " ".join(str(v) for v in value if isinstance(v, str))
    return ""


def text_tokens(*texts: Any, buckets: int = TEXT_BUCKETS, length: int = TEXT_LEN) -> list[int]:
    """Hashed bag of words: distinct lower-cased tokens (first `length`) -> crc32 % buckets (stable across runs)."""
    seen: dict[str, None] = {}
    for t in texts:
        for tok in _TOKEN.findall(_text(t).lower()):
            seen.setdefault(tok, None)
    return [zlib.crc32(tok.encode("utf-8")) % buckets for tok in list(seen)[:length]]


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

    def user_vectors(self, user_ids: Sequence[Any], histories: Sequence[Any], batch: int = 8192,
                     segments: Sequence[Any] | None = None, devices: Sequence[Any] | None = None) -> np.ndarray:
        """User vectors for raw user ids and raw histories (JSON strings or lists of item ids).

        `segments` / `devices` (raw values) override the catalog profile; unknown values use the unknown row.
        """
        urows = [self.user_row.get(_key(u), -1) for u in user_ids]
        hrows = [[self.item_row[i] for i in parse_history(h) if i in self.item_row] for h in histories]
        srows = drows = None
        if segments is not None:
            seg_row = {s: i for i, s in enumerate(getattr(self.model, "segments", []))}
            srows = [seg_row.get(_key(s), -1) for s in segments]
        if devices is not None:
            dev_row = {d: i for i, d in enumerate(getattr(self.model, "devices", []))}
            drows = [dev_row.get(_key(d), -1) for d in devices]
        out = np.zeros((len(urows), self.item_embeddings.shape[1]), dtype=np.float32)
        for s in range(0, len(urows), batch):
            out[s: s + batch] = encode_users(self.model, urows[s: s + batch], hrows[s: s + batch],
                                             None if srows is None else srows[s: s + batch],
                                             None if drows is None else drows[s: s + batch])
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


def _profile(users: pd.DataFrame, user_ids: list[str], column: str) -> tuple[list[str], np.ndarray]:
    """Distinct catalog values of `column` and each user's row (len(values) = unknown), [n_users + 1]."""
    if column not in users:
        return [], np.zeros(len(user_ids) + 1, dtype=np.int64)
    col = users[column]
    values = sorted({str(v) for v in col.dropna().unique()})
    index = {v: k for k, v in enumerate(values)}
    of = {str(u): index[str(v)] for u, v in zip(users["user_id"], col) if v is not None and str(v) in index}
    out = np.array([of.get(u, len(values)) for u in user_ids] + [len(values)], dtype=np.int64)
    return values, out


def _item_content(items: pd.DataFrame, train_rows: pd.DataFrame, item_ids: list[str], counts: np.ndarray,
                  buckets: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Per item row: hashed title + tags tokens [n_items, length] (padded with `buckets`) and dense
    [log1p(train positives) / log1p(max), log1p(age days at the newest train row, clipped) / log1p(max days)]."""
    n = len(item_ids)
    tokens = np.full((n, max(length, 1)), buckets, dtype=np.int64)
    row = {iid: k for k, iid in enumerate(item_ids)}
    title = items["title"] if "title" in items else pd.Series([None] * len(items), index=items.index)
    tags = items["tags"] if "tags" in items else pd.Series([None] * len(items), index=items.index)
    for iid, ti, ta in zip(items["item_id"].astype(str), title, tags):
        toks = text_tokens(ti, ta, buckets=buckets, length=length)
        if toks:
            tokens[row[iid], : len(toks)] = toks
    publish = np.full(n, np.nan)
    for src in (train_rows, items):  # the catalog wins over the rows' copy
        if "publish_ts" in src:
            for iid, ts in zip(src["item_id"].astype(str), pd.to_numeric(src["publish_ts"], errors="coerce")):
                if iid in row and np.isfinite(ts) and ts > 0:
                    publish[row[iid]] = ts
    if "timestamp" in train_rows and len(train_rows):
        now = float(pd.to_numeric(train_rows["timestamp"], errors="coerce").max())
    else:
        now = float(np.nanmax(publish)) if np.isfinite(publish).any() else 0.0
    age = np.clip((now - publish) / DAY_MS, 0.0, FRESHNESS_MAX_DAYS)
    age = np.where(np.isfinite(age), age, FRESHNESS_MAX_DAYS)  # unknown publish time: as old as it gets
    pop = np.log1p(counts) / max(np.log1p(counts.max()) if len(counts) else 0.0, 1e-9)
    dense = np.stack([pop, np.log1p(age) / np.log1p(FRESHNESS_MAX_DAYS)], axis=1).astype(np.float32)
    return tokens, dense


def _examples(rows: pd.DataFrame, user_row: dict[str, int], item_row: dict[str, int], n_users: int,
              n_items: int, history_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = rows[rows["label_binary"] == 1]
    items = np.array([item_row.get(i, -1) for i in pos["item_id"].astype(str)], dtype=np.int64)
    keep = items >= 0
    pos, items = pos[keep], items[keep]
    users = np.array([user_row.get(u, n_users) for u in pos["user_id"].astype(str)], dtype=np.int64)
    hist_col = tower_history_column(pos)  # the session's items, then the user's latest consumed (as served)
    # parsed and padded once per distinct history (a page's positives share one; the parse cache holds 100k):
    # the same rows as per positive, a fifth of the ranker's fold-tower time on the 2y-200k set was this parse
    codes, distinct = pd.factorize(np.asarray(hist_col, dtype=object))
    hists = [[item_row[i] for i in parse_history(h) if i in item_row] for h in distinct]
    return users, pad_histories(hists, n_items, history_len)[codes], items


@torch.no_grad()
def recall_at_k(model: TwoTower, item_embeddings: np.ndarray, users: np.ndarray, hist: np.ndarray,
                items: np.ndarray, k: int) -> float:
    """Share of positives whose item is in the user's top-k by inner product over the whole catalog."""
    return recall_at_ks(model, item_embeddings, users, hist, items, [k])[k]


@torch.no_grad()
def recall_at_ks(model: TwoTower, item_embeddings: np.ndarray, users: np.ndarray, hist: np.ndarray,
                 items: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """recall_at_k for several k with one scoring pass."""
    if len(items) == 0:
        return {k: float("nan") for k in ks}
    was_training = model.training
    model.eval()
    emb = torch.from_numpy(item_embeddings)
    hits = {k: 0 for k in ks}
    for s in range(0, len(items), 4096):
        u = model.user_tower(torch.from_numpy(users[s: s + 4096]), torch.from_numpy(hist[s: s + 4096]))
        scores = u @ emb.T
        target = scores.gather(1, torch.from_numpy(items[s: s + 4096]).unsqueeze(1))
        # rank = number of items scoring strictly higher (ties count in the model's favour)
        rank = (scores > target).sum(1)
        for k in ks:
            hits[k] += int((rank < min(k, item_embeddings.shape[0])).sum())
    model.train(was_training)
    return {k: hits[k] / len(items) for k in ks}


def retrieval_recall(tt: "TwoTowerResult", rows: pd.DataFrame, ks: Sequence[int] = REPORTED_RECALL_KS) -> dict[str, float]:
    """Recall@k of the retrieval stage on `rows`' positives (e.g. the test window), over the whole catalog.

    The ranker can only reorder what retrieval returns: this is the ceiling of the two-stage model,
    reported beside the chance level (k / catalog size). Positives on items outside the vocabulary
    count as misses (a new item retrievable by content is in the vocabulary).
    """
    n_items, n_users = len(tt.item_ids), len(tt.user_ids)
    history_len = int(tt.model.history_len)
    pos = rows[rows["label_binary"] == 1]
    users, hist, items = _examples(pos, tt.user_row, tt.item_row, n_users, n_items, history_len)
    out: dict[str, float] = {"positives": float(len(pos)), "positives_in_vocabulary": float(len(items))}
    found = recall_at_ks(tt.model, tt.item_embeddings, users, hist, items, list(ks))
    share = len(items) / len(pos) if len(pos) else float("nan")
    for k in ks:
        out[f"recall_at_{k}"] = float(found[k] * share) if len(items) else float("nan")
        out[f"random_recall_at_{k}"] = float(min(k, n_items) / max(n_items, 1))
    return out


def train_two_tower(train_rows: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame,
                    config: TwoTowerConfig | None = None, valid_rows: pd.DataFrame | None = None) -> TwoTowerResult:
    """Train both towers on the positive impressions of `train_rows`; report validation recall@k.

    With `valid_rows`, validation recall@config.recall_k is measured after every epoch; training stops
    after `config.patience` epochs without improvement and the best epoch's weights are returned.
    """
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
    segments, user_segment = _profile(users, user_ids, "segment")
    devices, user_device = _profile(users, user_ids, "device_type")

    users_t, hist_t, items_t = _examples(train_rows, user_row, item_row, n_users, n_items, config.history_len)
    n = len(items_t)
    if n == 0:
        raise ValueError("no positive training rows (label_binary == 1) for the two-tower model")
    counts = np.bincount(items_t, minlength=n_items).astype(np.float64)
    tokens, dense = _item_content(items, train_rows, item_ids, counts, config.text_buckets, config.text_len)

    model = TwoTower(n_users, n_items, len(categories), dim=config.dim, hidden=config.hidden,
                     history_len=config.history_len, version=MODEL_VERSION, text_buckets=config.text_buckets,
                     text_len=config.text_len, segments=segments, devices=devices)
    with torch.no_grad():
        model.item_category.copy_(torch.tensor([cat_index.get(cat_of.get(i, ""), len(categories)) for i in item_ids],
                                               dtype=torch.long))
        model.item_tokens.copy_(torch.from_numpy(tokens))
        model.item_dense.copy_(torch.from_numpy(dense))
        # id rows only for items / users with training positives: the rest is content / profile only
        model.item_has_id.copy_(torch.from_numpy((counts > 0).astype(np.float32)))
        user_has = np.zeros(n_users + 1, dtype=np.float32)
        user_has[users_t[users_t < n_users]] = 1.0
        model.user_has_id.copy_(torch.from_numpy(user_has))
        model.user_segment.copy_(torch.from_numpy(user_segment))
        model.user_device.copy_(torch.from_numpy(user_device))
        # items never in a training history get no gradient: zero rows (no noise at serving), kept zero by Adam
        in_hist = np.zeros(n_items + 1, dtype=bool)
        in_hist[np.unique(hist_t)] = True
        model.hist_emb.weight[torch.from_numpy(~in_hist)] = 0.0

    # log-Q: the chance an item shows up as an in-batch negative is proportional to its positive count
    log_q = torch.from_numpy(np.log((counts + 1.0) / (counts.sum() + n_items)).astype(np.float32))

    valid = None
    if valid_rows is not None and len(valid_rows):
        valid = _examples(valid_rows, user_row, item_row, n_users, n_items, config.history_len)
        valid_cap = int(config.max_validation_examples)
        if valid_cap > 0 and len(valid[2]) > valid_cap:  # own stream: the training draws stay those of an uncapped run
            keep = np.sort(np.random.default_rng(config.seed + 1).choice(len(valid[2]), size=valid_cap, replace=False))
            valid = (valid[0][keep], valid[1][keep], valid[2][keep])
        if not len(valid[2]):
            valid = None
    ks = sorted({*REPORTED_RECALL_KS, int(config.recall_k)})

    # fused: one kernel over every parameter instead of a Python loop of tensor ops; the same Adam update. The
    # id tables are dense (users x dim): on a 132k-user log the unfused step took 170 ms of a 215 ms batch, fused 26 ms
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    bs = max(2, int(config.batch_size))
    losses: list[float] = []
    best_recall, best_epoch, best_state, stale = -1.0, 0, None, 0
    history: list[float] = []
    epochs_run = 0
    per_epoch = n if int(config.max_examples_per_epoch) <= 0 else min(n, int(config.max_examples_per_epoch))
    for epoch in range(config.epochs):
        model.train()
        perm = rng.permutation(n)[:per_epoch]
        epoch_loss, batches = 0.0, 0
        for s in range(0, per_epoch, bs):
            idx = perm[s: s + bs]
            if len(idx) < 2:
                continue
            u = users_t[idx].copy()
            seg = torch.from_numpy(user_segment[u])
            dev = torch.from_numpy(user_device[u])
            if config.unknown_user_dropout > 0:
                drop = rng.random(len(idx)) < config.unknown_user_dropout
                u[drop] = n_users
                no_profile = torch.from_numpy(drop & (rng.random(len(idx)) < 0.5))
                seg = seg.masked_fill(no_profile, len(segments))
                dev = dev.masked_fill(no_profile, len(devices))
            content_only = None
            if config.unknown_item_dropout > 0:
                content_only = torch.from_numpy(rng.random(len(idx)) < config.unknown_item_dropout)
            it = torch.from_numpy(items_t[idx])
            uv = model.user_tower(torch.from_numpy(u), torch.from_numpy(hist_t[idx]), seg, dev)
            iv = model.item_tower(it, content_only)
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
        epochs_run = epoch + 1
        if valid is None:
            continue
        model.eval()
        rec = recall_at_ks(model, model.all_item_embeddings(), *valid, [config.recall_k])[config.recall_k]
        history.append(rec)
        if rec > best_recall:
            best_recall, best_epoch, stale = rec, epochs_run, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= max(int(config.patience), 1):
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = epochs_run
    model.eval()
    emb = model.all_item_embeddings()
    metrics: dict[str, float] = {"train_positives": float(n),
                                 "final_train_loss": float(losses[best_epoch - 1]) if losses else float("nan"),
                                 "train_seconds": 0.0, "best_epoch": float(best_epoch),
                                 "epochs_run": float(epochs_run), "examples_per_epoch": float(per_epoch),
                                 "examples_seen": float(per_epoch * epochs_run),
                                 "steps": float(epochs_run * sum(1 for s in range(0, per_epoch, bs) if per_epoch - s >= 2)),
                                 "budget_capped": float(per_epoch < n)}
    for k in ks:
        metrics[f"random_recall_at_{k}"] = float(min(k, n_items) / n_items)
    if valid is not None:
        for k, r in recall_at_ks(model, emb, *valid, ks).items():
            metrics[f"validation_recall_at_{k}"] = float(r)
        metrics[f"validation_recall_at_{config.recall_k}"] = float(best_recall)
        metrics["validation_positives"] = float(len(valid[2]))  # the (sampled) positives scored
    metrics["train_seconds"] = round(time.perf_counter() - t0, 3)
    log.info("two-tower trained: %s (validation recall@%d by epoch: %s)", metrics, config.recall_k,
             [round(r, 4) for r in history])
    return TwoTowerResult(model=model, item_ids=item_ids, user_ids=user_ids, item_embeddings=emb, metrics=metrics,
                          config=asdict(config))
