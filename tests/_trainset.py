"""A training set built from the simulator by the product's own code: fixtures for model tests.

The pipeline's steps, each the product function the Dagster assets run, over a scratch lake: silver is
`ingestion.refine.refine_batch` (the GX event contract, bot and duplicate filters) over the whole log as one
batch; labels are `ingestion.labels.build_labels` with its default LabelConfig, read once every attribution
window has closed so that no impression is left unlabeled; the user and item snapshots are
`features.batch.user_snapshots` / `item_snapshots` in Spark; the set is `training.dataset.build_training_set`
(as-of joins, replayed session features, the time split), written and read back as the
training_set asset does. No rule is re-implemented here: a test model trains on what the product would
have written.
"""
from __future__ import annotations

import tempfile
import pandas as pd

from features.batch import item_snapshots, user_snapshots
from ingestion.labels import LabelConfig, build_labels
from ingestion.refine import refine_batch
from lake.delta import DeltaLake
from lake.spark import spark_session
from lake.spark_read import spark_read
from lake.spark_write import spark_write
from training.dataset import SplitConfig, build_training_set, read_training_set

LABELS = LabelConfig()  # the product's rule, no catalog negatives: the fixture stays one row per impression
SPLIT = SplitConfig(validation_days=2.0, test_days=1.0)  # the small world's last day tests, the two before validate


def silver_events(events: pd.DataFrame) -> pd.DataFrame:
    """The silver rows of `events`: the product's refine over the whole log as one batch, judged just after its
    last event (nothing is in the future)."""
    now_ms = int(pd.to_numeric(events["timestamp"]).max()) + 1
    return refine_batch(events, ingest_date="fixture", run_id="trainset", now_ms=now_ms).accepted


def clean_events(events: pd.DataFrame) -> pd.DataFrame:
    """The raw rows (all of `events`' columns) that silver accepts, in silver's order."""
    accepted = silver_events(events)["event_id"]
    return events.drop_duplicates("event_id").set_index("event_id").loc[accepted].reset_index()[list(events.columns)]


def _labels(ev: pd.DataFrame) -> pd.DataFrame:
    """The labels job's rows. The world is over, so labels are read as of the last event plus one attribution
    window (every window closed, nothing after the log is known): the labels job run then would write these."""
    as_of = int(ev["timestamp"].max()) + 1 + int(LABELS.attribution_window_ms)
    return build_labels(ev, as_of_ms=as_of, config=LABELS)


_BUILT: dict[int, tuple[object, pd.DataFrame]] = {}  # id(world) -> (world, its set): built once per test session


def _built(world) -> pd.DataFrame:
    """One world's set, built once per test session (Spark is the slow part)."""
    if id(world) in _BUILT:
        return _BUILT[id(world)][1]
    ev = silver_events(world.events)
    labels = _labels(ev)
    assert labels["label"].notna().all(), "every impression is labeled once every attribution window has closed"
    with tempfile.TemporaryDirectory(prefix="kairos-trainset-") as root:
        lake = DeltaLake(root)
        frames = {"silver": ev, "labels": labels, "items": world.items, "users": world.users}
        for table, frame in frames.items():
            lake.write(table, frame)
        spark = spark_session("local[2]")
        read = {t: spark_read(spark, lake, t, lake.pin(t).version) for t in frames}
        built, _ = build_training_set(spark, read["labels"], read["silver"],
                                      user_snapshots(spark, read["silver"], read["items"], read["users"]),
                                      item_snapshots(spark, read["silver"], read["items"]), world.items, SPLIT)
        out = spark_write(spark, lake, "training_set", built)
        frame = read_training_set(lake, "training_set", out.version)
    _BUILT[id(world)] = (world, frame)
    return frame


def make_training_set(world) -> pd.DataFrame:
    """The world's training set (a fresh copy: callers may change it)."""
    return _built(world).copy()
