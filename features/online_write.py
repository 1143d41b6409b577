"""The online store's write path: whole snapshots under a new version, incremental item writes, cleanup of old
versions (mixed into features.online.OnlineStore)."""
from __future__ import annotations

import json
import logging
import math
import time
import uuid
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from features.registry import ITEM_STORE_COLUMNS, USER_HISTORY_COLUMNS, USER_STORE_COLUMNS
from features.online_keys import (CURRENT_KEY, PREFIX, VERSIONS_KEY, _s, _str, changes_key, items_key, meta_key,
                                  popular_key, published_key, rev_key, text_key, user_key)
from features.online_codec import ItemCodec, ROW_FORMAT, _is_missing, _user_mapping, check_columns

log = logging.getLogger("kairos.online")

DEFAULT_TTL_S = 7 * 86400
CHUNK = 2000
ITEM_CHUNK = 5000
PROGRESS_EVERY = 20  # chunks between progress log lines (100k items, 40k users)
# the publish_ts index holds only this many newest items (the fresh channel never looks further back, so a
# fresh window is at most this long)
PUBLISHED_KEEP = 20_000


class StoreWriter:
    """The online store's write path (whole snapshots, incremental item writes, old-version cleanup), mixed into
    OnlineStore: it needs only the store's `client` and `_binary()`."""

    client: Any

    def _binary(self) -> Any:
        raise NotImplementedError

    def materialize(self, users: pd.DataFrame, items: pd.DataFrame, version: str, ttl_s: int = DEFAULT_TTL_S,
                    popular: Iterable[str] | None = None) -> dict[str, Any]:
        """Write a whole snapshot under `version`, then flip `kairos:fs:current` to it.

        Every key of the version, and `current` itself, expires at one instant (now + ttl_s), so the pointer
        can never outlive what it points to. Unknown columns are refused before anything is written."""
        t0 = time.perf_counter()
        version = str(version)
        check_columns(users, "user_id", (*USER_STORE_COLUMNS, *USER_HISTORY_COLUMNS), "user")
        check_columns(items, "item_id", ITEM_STORE_COLUMNS, "item")
        codec = ItemCodec.from_registry()
        expires_at_ms = int(time.time() * 1000) + int(ttl_s) * 1000
        c = self.client
        previous = _s(c.get(CURRENT_KEY))
        n_users = 0
        records = users.to_dict("records") if len(users) else []
        for start in range(0, len(records), CHUNK):
            # one MULTI per chunk: re-materializing a live version never exposes a deleted-but-unwritten user
            pipe = c.pipeline(transaction=True)
            for row in records[start:start + CHUNK]:
                uid = row.get("user_id")
                if _is_missing(uid):
                    continue
                key = user_key(version, str(uid))
                mapping = _user_mapping(row)
                pipe.delete(key)
                pipe.hset(key, mapping=mapping or {"_": "1"})  # a known user with every value missing: a marker
                pipe.pexpireat(key, expires_at_ms)
                n_users += 1
            pipe.execute()
            if (start // CHUNK) % PROGRESS_EVERY == PROGRESS_EVERY - 1:
                log.info("materialize %s: users %d/%d written", version, n_users, len(records))
        t_users = time.perf_counter() - t0
        t1 = time.perf_counter()
        texts = {col: sorted({str(v) for v in items[col].tolist() if not _is_missing(v)}) if col in items else []
                 for col in codec.text}
        codes = {col: {v: k + 1 for k, v in enumerate(values)} for col, values in texts.items()}
        packed, published = self._pack(items, codec, codes)
        if len(published) > PUBLISHED_KEEP:  # only the newest are ever fresh
            newest = sorted(published.items(), key=lambda kv: kv[1], reverse=True)[:PUBLISHED_KEEP]
            published = dict(newest)
        item_bytes = sum(len(v) for v in packed.values())
        t_pack = time.perf_counter() - t1
        # rows go to scratch keys, renamed over the live ones in one transaction: a reader of this version
        # sees the old rows or the new ones, never a half-written mix
        nonce = uuid.uuid4().hex[:12]
        live_keys = {"items": items_key(version), "published": published_key(version),
                     **{f"text:{col}": text_key(version, col) for col in codec.text}}
        tmp = {name: f"{key}:tmp:{nonce}" for name, key in live_keys.items()}
        b = self._binary()
        ids = list(packed)
        for start in range(0, len(ids), ITEM_CHUNK):
            pipe = b.pipeline(transaction=False)
            chunk = ids[start:start + ITEM_CHUNK]
            pipe.hset(tmp["items"], mapping={i: packed[i] for i in chunk})
            pub = {i: published[i] for i in chunk if i in published}
            if pub:
                pipe.zadd(tmp["published"], pub)
            pipe.execute()
            if (start // ITEM_CHUNK) % PROGRESS_EVERY == PROGRESS_EVERY - 1:
                log.info("materialize %s: items %d/%d written", version, start + len(chunk), len(ids))
        pipe = b.pipeline(transaction=False)
        for col, values in texts.items():
            if values:
                pipe.rpush(tmp[f"text:{col}"], *values)
        for key in tmp.values():
            pipe.pexpire(key, 3_600_000)  # scratch keys of a crashed write do not linger
        pipe.execute()
        if popular is None:
            popular = (items.sort_values("item_clicks_7d", ascending=False, na_position="last")["item_id"].tolist()
                       if "item_clicks_7d" in items else items["item_id"].tolist())[:500]
        popular = [str(i) for i in popular]
        meta = {"users": n_users, "items": len(packed), "written_at": time.time(), "expires_at_ms": expires_at_ms,
                "layout": codec.to_doc(), "row_format": ROW_FORMAT}
        sizes = {"items": len(ids), "published": len(published), **{f"text:{c}": len(v) for c, v in texts.items()}}
        pipe = c.pipeline(transaction=True)
        for name, live in live_keys.items():
            if sizes[name]:
                pipe.rename(tmp[name], live)
                pipe.pexpireat(live, expires_at_ms)
            else:
                pipe.delete(live)
        pipe.delete(changes_key(version), rev_key(version))
        pipe.hset(rev_key(version), mapping={"epoch": nonce, "seq": 0})
        pipe.pexpireat(rev_key(version), expires_at_ms)
        pipe.set(popular_key(version), json.dumps(popular), pxat=expires_at_ms)
        pipe.set(meta_key(version), json.dumps(meta), pxat=expires_at_ms)
        pipe.zadd(VERSIONS_KEY, {version: expires_at_ms})
        pipe.execute()
        # everything is written: now flip readers to the new version (the pointer expires with its data)
        c.set(CURRENT_KEY, version, pxat=expires_at_ms)
        # keep the new version and the one before it (readers mid-request, instant rollback)
        others = [_str(v) for v in c.zrevrange(VERSIONS_KEY, 0, -1) if _str(v) != version]
        deleted = self._cleanup(keep={version, *others[:1]})
        seconds = time.perf_counter() - t0
        log.info("materialized %d users, %d items as %s in %.2fs (previous %s, deleted %s)",
                 n_users, len(packed), version, seconds, previous, deleted)
        return {"version": version, "previous_version": previous or "", "users_written": n_users,
                "items_written": len(packed), "popular_written": len(popular), "item_row_bytes": item_bytes,
                "expires_at_ms": expires_at_ms, "versions_deleted": len(deleted),
                "user_write_seconds": round(t_users, 3), "item_pack_seconds": round(t_pack, 3),
                "seconds": round(seconds, 3)}

    @staticmethod
    def _pack(items: pd.DataFrame, codec: ItemCodec,
              codes: Mapping[str, Mapping[str, int]]) -> tuple[dict[str, bytes], dict[str, float]]:
        """item_id -> packed row, and item_id -> publish_ts for the items that have one."""
        items = items[~items["item_id"].isna()]
        ids = items["item_id"].astype(str).tolist()
        packed = dict(zip(ids, codec.encode_frame(items, codes)))
        published: dict[str, float] = {}
        if "publish_ts" in items:
            ts = pd.to_numeric(items["publish_ts"], errors="raise").to_numpy(dtype=np.float64)
            published = {i: float(t) for i, t in zip(ids, ts.tolist()) if not math.isnan(t)}
        return packed, published

    def write_items(self, items: pd.DataFrame, version: str | None = None) -> dict[str, Any]:
        """Write new or changed items alone into the live version (or `version`), with its layout and expiry.

        A row replaces the item's row whole (a column the frame lacks reads as missing). The rows, the
        fresh-channel index, new text values and the version's seq move in one transaction, so every server
        drops exactly these rows from its cache on its next request and the fresh channel sees a new item at
        once."""
        import redis

        check_columns(items, "item_id", ITEM_STORE_COLUMNS, "item")
        c = self.client
        version = str(version or _s(c.get(CURRENT_KEY)) or "")
        if not version:
            raise ValueError("no live online-store version to write items into: materialize a snapshot first "
                             "(the online_features asset)")
        raw_meta = c.get(meta_key(version))
        if raw_meta is None:
            raise ValueError(f"online-store version {version!r} does not exist (expired or never written): "
                             f"materialize a snapshot first")
        meta = json.loads(_str(raw_meta))
        codec = ItemCodec.from_doc(meta["layout"])
        expires_at_ms = int(meta["expires_at_ms"])
        if not len(items):
            return {"version": version, "items_written": 0, "seq": None}
        for _attempt in range(50):
            with c.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(rev_key(version))
                    seq = int(pipe.hget(rev_key(version), "seq") or 0) + 1
                    codes, added = {}, {}
                    for col in codec.text:
                        known = [_str(v) for v in pipe.lrange(text_key(version, col), 0, -1)]
                        fresh = sorted({str(v) for v in items[col].tolist() if not _is_missing(v)} - set(known)) \
                            if col in items else []
                        codes[col] = {v: k + 1 for k, v in enumerate(known + fresh)}
                        added[col] = fresh
                    packed, published = self._pack(items, codec, codes)
                    no_ts = [i for i in packed if i not in published]
                    pipe.multi()
                    pipe.hset(items_key(version), mapping=packed)
                    if published:
                        pipe.zadd(published_key(version), published)
                        pipe.zremrangebyrank(published_key(version), 0, -(PUBLISHED_KEEP + 1))
                    if no_ts:
                        pipe.zrem(published_key(version), *no_ts)
                    for col, values in added.items():
                        if values:
                            pipe.rpush(text_key(version, col), *values)
                    pipe.zadd(changes_key(version), {i: seq for i in packed})
                    pipe.hset(rev_key(version), "seq", seq)
                    for key in (items_key(version), published_key(version), changes_key(version), rev_key(version),
                                *(text_key(version, col) for col in codec.text)):
                        pipe.pexpireat(key, expires_at_ms)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        else:
            raise RuntimeError(f"could not write items into {version}: the version kept changing under 50 tries")
        log.info("wrote %d item rows into %s (seq %d)", len(packed), version, seq)
        return {"version": version, "items_written": len(packed), "seq": seq}

    def _cleanup(self, keep: set[str]) -> list[str]:
        c = self.client
        now_ms = int(time.time() * 1000)
        versions = [_str(v) for v in c.zrange(VERSIONS_KEY, 0, -1)]
        doomed = [v for v in versions if v not in keep]
        for v in doomed:
            batch: list[str] = []
            for key in c.scan_iter(match=f"{PREFIX}:{v}:*", count=1000):
                batch.append(_str(key))
                if len(batch) >= 1000:
                    c.unlink(*batch)
                    batch = []
            if batch:
                c.unlink(*batch)
            c.zrem(VERSIONS_KEY, v)
        # members whose data has expired are gone too; the list itself lives as long as its longest member
        c.zremrangebyscore(VERSIONS_KEY, "-inf", now_ms)
        newest = c.zrange(VERSIONS_KEY, -1, -1, withscores=True)
        if newest:
            c.pexpireat(VERSIONS_KEY, int(newest[0][1]))
        return doomed
