"""The exclusion list of forgotten users, honoured by ingestion and training.

A user who asked to be forgotten must not come back when a source is re-ingested or a model
retrained. The list is the Delta table `forgotten_users`, and it stores a keyed hash of the user
id (HMAC-SHA256 with KAIROS_PRIVACY_KEY), never the raw id: a list of who asked to be forgotten
is itself personal data, and an unkeyed sha256 of ids like `u00042` is reversed by enumerating
the id space. The key lets ingestion recognise the user (hash each incoming id, drop matches)
without the list naming anyone.
"""
from __future__ import annotations

import hashlib
import hmac

import pandas as pd

from ground.settings import Settings, privacy_key
from lake.delta import DeltaLake

FORGOTTEN_USERS = "forgotten_users"
PRIVACY_AUDIT = "privacy_audit"
COMPLIANCE_TABLES = (FORGOTTEN_USERS, PRIVACY_AUDIT)


def user_hash(key: bytes, user_id: str) -> str:
    """HMAC-SHA256 of a user id under the privacy key (hex)."""
    return hmac.new(key, str(user_id).encode(), hashlib.sha256).hexdigest()


def forgotten_hashes(lake: DeltaLake) -> frozenset[str]:
    """Every forgotten user's hash (empty when nobody asked yet)."""
    if not lake.exists(FORGOTTEN_USERS):
        return frozenset()
    return frozenset(lake.read(FORGOTTEN_USERS, columns=["user_hash"])["user_hash"].astype(str))


def forgotten_mask(user_ids: pd.Series, hashes: frozenset[str], key: bytes) -> pd.Series:
    """True where the row's user is on the exclusion list (pure: ids, hashes and key in)."""
    if not hashes or user_ids.empty:
        return pd.Series(False, index=user_ids.index)
    unique = user_ids.dropna().astype(str).unique()
    hit = {u for u in unique if user_hash(key, u) in hashes}
    return user_ids.astype(str).isin(hit) & user_ids.notna()


def drop_forgotten(frame: pd.DataFrame, lake: DeltaLake, settings: Settings | None = None,
                   column: str = "user_id") -> tuple[pd.DataFrame, int]:
    """The frame without rows of forgotten users, and how many rows were dropped."""
    if column not in frame or frame.empty:
        return frame, 0
    hashes = forgotten_hashes(lake)
    if not hashes:
        return frame, 0
    mask = forgotten_mask(frame[column], hashes, privacy_key(settings or Settings.from_env()))
    dropped = int(mask.sum())
    return (frame[~mask].reset_index(drop=True) if dropped else frame), dropped
