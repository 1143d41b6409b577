"""The two-tower's training knobs, torch-free: the Dagster run config of `two_tower_model` is built from this
dataclass (assets/config.py) when the code location loads, which must not import torch."""
from __future__ import annotations

from dataclasses import dataclass

from features.functions import SESSION_HISTORY_FOR_TOWER
from models.two_tower_shape import TEXT_BUCKETS, TEXT_LEN

# what train_two_tower (and the affinity of its towers) reads of the training set, plus the split and the row order:
# a fraction of its columns (the two_tower_model asset reads only these; the ranker's fold towers copy only these)
TWO_TOWER_COLUMNS = ["event_id", "timestamp", "split", "user_id", "item_id", "category", "publish_ts", "label_binary",
                     "session_last_items", "user_recent_items"]


@dataclass
class TwoTowerConfig:
    # the issue asks for 128-d; 64 stays the default because tests/test_training.py and the Dagster
    # asset config (assets/training.py) pin 64. The FAISS code reads the width from the array.
    dim: int = 128
    epochs: int = 8
    batch_size: int = 512
    lr: float = 0.01
    temperature: float = 0.05
    seed: int = 7
    hidden: int = 128
    weight_decay: float = 1e-6
    logq_correction: bool = True
    # share of training examples whose user id is replaced by "unknown" (trains the cold-start row);
    # half of those also lose the profile (trains the unknown segment/device rows)
    unknown_user_dropout: float = 0.1
    # share of in-batch items embedded from content alone (id part and popularity zeroed): trains
    # the tower for items that have no training positives yet
    unknown_item_dropout: float = 0.1
    history_len: int = SESSION_HISTORY_FOR_TOWER
    # early stopping: validation recall@recall_k after every epoch, stop after `patience` epochs
    # without improvement, keep the best epoch's weights
    recall_k: int = 100
    patience: int = 2
    text_buckets: int = TEXT_BUCKETS
    text_len: int = TEXT_LEN
    # training budget, so a large log trains in bounded time (0 = no cap): every epoch draws a seeded sample of
    # at most `max_examples_per_epoch` positives (an epoch over fewer positives is the plain permutation, so small
    # logs train exactly as without the cap), and early stopping scores a fixed seeded sample of at most
    # `max_validation_examples` validation positives (each scoring pass is over the whole catalog)
    max_examples_per_epoch: int = 100_000
    max_validation_examples: int = 20_000
    # 1 thread: on 2 shared cores, 2 intra-op threads measured up to 30x slower under contention
    num_threads: int = 1
