"""Bring your own log: delimiters, encodings, anonymous sessions, composite times, catalog files,
MovieLens folders from the source config, the label rule per log kind and the derived world."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ingestion.catalog import ItemCatalogMapping, join_items, read_item_catalog
from ingestion.generic import ColumnMapping, load_interactions
from ingestion.movielens import ImportError_
from data_contracts.schema import DAY_MS, ITEM_SCHEMA
from ingestion.sources import LABEL_RULES, load_source_frames, log_kind
from ingestion.synthetic_logs import SESSION_CLICKS_MAPPING, write_ratings_latest, write_session_clicks
from orchestration.world import WorldError, derive_split, resolve_world
from ingestion.labels import LabelConfig, build_labels, untrainable_reason

SESSION_LOG = ("session_id;user_id;item_id;timeframe;eventdate\n"
               "1;NA;81766;526309;2016-05-09\n"
               "1;NA;31331;1031018;2016-05-09\n"
               "2;5;32118;0;2016-05-10\n"
               "2;5;81766;61000;2016-05-10\n")


def _session_mapping(**extra) -> ColumnMapping:
    return ColumnMapping.from_dict({**SESSION_CLICKS_MAPPING, **extra})


def test_semicolon_csv_anonymous_sessions_and_composite_time(tmp_path: Path) -> None:
    log = tmp_path / "train-clicks.csv"
    log.write_text(SESSION_LOG)
    events, items, users = load_interactions(log, _session_mapping())

    clicks = events[events["event_type"] == "click"].sort_values("timestamp")
    day = int(pd.Timestamp("2016-05-09", tz="UTC").value // 1_000_000)
    # time = the date's midnight + the millisecond offset column
    assert clicks["timestamp"].tolist() == [day + 526_309, day + 1_031_018, day + DAY_MS, day + DAY_MS + 61_000]
    # "NA" is no user: the anonymous session is its own session-scoped identity, nothing is quarantined
    assert clicks["user_id"].tolist() == ["anon:1", "anon:1", "5", "5"]
    assert set(users["user_id"]) == {"anon:1", "5"}
    assert clicks["session_id"].tolist() == ["1", "1", "2", "2"]
    # click-only: one implied impression per (session, item), a second before its first click
    imp = events[events["event_type"] == "impression"].sort_values("timestamp")
    assert len(imp) == 4 and (imp["timestamp"].to_numpy() == clicks["timestamp"].to_numpy() - 1000).all()

    quarantine = load_interactions(log, _session_mapping(anonymous_users="quarantine"))[0]
    assert quarantine["user_id"].isna().sum() == 4  # kept null: the contract quarantines them with a reason


def test_explicit_delimiter_overrides_sniffing_and_a_wrong_one_names_the_header(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    log.write_text("uid|sku|ts\nu1|a|1000\n")
    events, _, _ = load_interactions(log, ColumnMapping(user="uid", item="sku", timestamp="ts"))
    assert events.loc[events["event_type"] == "click", "item_id"].tolist() == ["a"]
    with pytest.raises(ImportError_, match=re.escape(f"{log}: line 1 (header) lacks mapped column(s)")):
        load_interactions(log, ColumnMapping(user="uid", item="sku", timestamp="ts", delimiter=";"))


def test_latin1_and_binary_files_name_file_line_and_column(tmp_path: Path) -> None:
    log = tmp_path / "latin.csv"
    log.write_bytes("uid,title,sku,ts\nu1,ok,a,1000\nu2,Caf\u00e9,b,2000\n".encode("latin-1"))
    mapping = {"user": "uid", "item": "sku", "timestamp": "ts"}
    with pytest.raises(ImportError_, match=re.escape(f"{log}: line 3, column 'title' (byte offset")) as err:
        load_interactions(log, ColumnMapping.from_dict(mapping))
    assert "not valid utf-8" in str(err.value) and "latin-1" in str(err.value)
    events, _, _ = load_interactions(log, ColumnMapping.from_dict({**mapping, "encoding": "latin-1"}))
    assert sorted(events.loc[events["event_type"] == "click", "user_id"]) == ["u1", "u2"]

    binary = tmp_path / "dump.csv"
    binary.write_bytes(b"uid,sku,ts\nu1,a,1000\n\x00\x01\x02\xff")
    with pytest.raises(ImportError_, match=re.escape(f"{binary}: line 3 holds a NUL byte")):
        load_interactions(binary, ColumnMapping.from_dict(mapping))
    with pytest.raises(ValueError, match="unknown text encoding 'klingon'"):
        ColumnMapping.from_dict({**mapping, "encoding": "klingon"})


def test_catalog_file_joins_categories_titles_and_unseen_items(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("uid,sku,ts\nu1,10,1000\nu1,99,2000\n")
    catalog = tmp_path / "movies.csv"
    catalog.write_text("movieId,title,genres,released\n10,Heat (1995),Action|Crime|Thriller,816000000\n"
                       "20,Up (2009),(no genres listed),\n30,Alien (1979),Horror|Sci-Fi,300000000\n")
    _, log_items, _ = load_interactions(log, ColumnMapping(user="uid", item="sku", timestamp="ts"))
    mapping = ItemCatalogMapping.from_dict({"item": "movieId", "title": "title", "categories": "genres"})
    items = join_items(log_items, read_item_catalog(catalog, mapping)).set_index("item_id")
    assert list(items.reset_index().columns) == ITEM_SCHEMA.names
    assert items.loc["10", "category"] == "Action" and items.loc["10", "tags"] == "Action Crime Thriller"
    assert items.loc["10", "title"] == "Heat (1995)"
    assert items.loc["20", "category"] == "unknown"          # "(no genres listed)" is no category
    assert items.loc["99", "category"] == "unknown"          # in the log only: log defaults
    assert "30" in items.index                               # in the catalog only: still a candidate
    assert items.loc["10", "publish_ts"] == 1_000_000 and items.loc["30", "publish_ts"] == 1_000_000

    with pytest.raises(ValueError, match=r"unknown ItemCatalogMapping key\(s\) \['genre'\]"):
        ItemCatalogMapping.from_dict({"item": "movieId", "genre": "genres"})
    dup = tmp_path / "dup.csv"
    dup.write_text("movieId,title\n10,a\n10,b\n")
    with pytest.raises(ImportError_, match=re.escape(f"{dup}: line 3, column 'movieId': id '10' appears twice")):
        read_item_catalog(dup, ItemCatalogMapping(item="movieId"))


def test_movielens_folders_and_catalog_files_through_the_source_config(tmp_path: Path) -> None:
    latest = write_ratings_latest(tmp_path / "latest", n_events=3000, years=20, seed=3)
    events, items, _ = load_source_frames({"source": "movielens-latest", "path": str(latest)})
    assert (events["event_type"] == "impression").sum() == len(pd.read_csv(latest / "ratings.csv"))
    assert items["category"].str.startswith("Genre").all()   # genres kept, not "unknown"
    span_years = (events["timestamp"].max() - events["timestamp"].min()) / (365 * DAY_MS)
    assert span_years > 15

    one_m = tmp_path / "ml-1m"
    one_m.mkdir()
    (one_m / "ratings.dat").write_text("1::10::5::978300760\n2::20::2::978300800\n")
    (one_m / "movies.dat").write_text("10::Heat (1995)::Action|Crime\n20::Up (2009)::Animation\n")
    (one_m / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    events, items, users = load_source_frames({"source": "movielens-1m", "path": str(one_m)})
    assert sorted(items["category"]) == ["Action", "Animation"] and len(users) == 2

    clicks, products = write_session_clicks(tmp_path / "sess", n_events=2000, years=0.2, seed=5)
    config = {"source": "file", "path": str(clicks), "mapping_json": _session_mapping().to_json(),
              "catalog_path": str(products), "catalog_mapping_json": '{"item": "itemId", "categories": "categoryId"}'}
    events, items, users = load_source_frames(config)
    assert (items["category"] != "unknown").all() and users["user_id"].str.startswith("anon:").any()
    assert log_kind(config, events) == "clicks"


def test_click_only_log_is_trainable_under_its_label_rule_only(tmp_path: Path) -> None:
    log = tmp_path / "clicks.csv"
    log.write_text(SESSION_LOG)
    events, _, _ = load_interactions(log, _session_mapping())
    window = 3_600_000
    as_of = int(events["timestamp"].max()) + window  # every attribution window has closed
    plain = build_labels(events, as_of, LabelConfig(attribution_window_ms=window))
    assert plain["label_binary"].sum() == 0  # a dwell-less click scores 0.1 < 0.3
    reason = untrainable_reason(events, plain, click_is_positive=False)
    assert "click_is_positive" in reason
    rule = LABEL_RULES["clicks"]
    ruled = build_labels(events, as_of, LabelConfig(attribution_window_ms=window,
                                                    click_is_positive=rule["click_is_positive"]))
    assert ruled["label_binary"].tolist() == [1, 1, 1, 1]


def test_world_derives_partitions_split_and_labels_or_refuses_early(tmp_path: Path) -> None:
    latest = write_ratings_latest(tmp_path / "latest", n_events=8000, years=20, seed=4)
    world = resolve_world({"source": "movielens-latest", "path": str(latest)})
    ts = load_source_frames(world.source)[0]["timestamp"]
    # twenty years arrive as one ingest batch on the log's last day (one partition, a few Delta commits) ...
    assert world.partition_start == pd.to_datetime(ts.max(), unit="ms").strftime("%Y-%m-%d")
    assert world.summary["ingest_days"] == 1 and world.summary["span_days"] > 7000
    # ... or, asked for, each event on its own day: partitions start at the first event
    per_day = resolve_world({"source": "movielens-latest", "path": str(latest), "arrival": "event"})
    assert per_day.partition_start == pd.to_datetime(ts.min(), unit="ms").strftime("%Y-%m-%d")
    assert per_day.summary["ingest_days"] > 500
    split = world.ops["training_set"]["config"]
    assert split["test_days"] > 30 and split["validation_days"] > 30  # years of data: windows sized to it
    s = world.summary
    total = s["train_impressions"] + s["validation_impressions"] + s["test_impressions"]
    assert 0.05 < s["test_impressions"] / total < 0.2 and 0.05 < s["validation_impressions"] / total < 0.2
    assert world.ops["labels"]["config"] == LABEL_RULES["ratings"]

    clicks, _ = write_session_clicks(tmp_path / "sess", n_events=3000, years=0.3, seed=6)
    spec = {"source": "file", "path": str(clicks), "mapping": SESSION_CLICKS_MAPPING,
            "gate": {"min_ndcg_lift_over_popularity": 0.05}, "serving": {"num_results": 5},
            "ops": {"two_tower_model": {"config": {"epochs": 2}}}}
    world = resolve_world(spec)
    assert world.log_kind == "clicks" and world.ops["labels"]["config"]["click_is_positive"] is True
    assert world.ops["validation_gate"]["config"] == {"min_ndcg_lift_over_popularity": 0.05}
    assert world.ops["two_tower_model"] == {"config": {"epochs": 2}} and world.serving["num_results"] == 5

    once = tmp_path / "once.csv"  # every (session, item) clicked once: without the click rule nothing is positive
    once.write_text(SESSION_LOG)
    with pytest.raises(WorldError, match="cannot train: no positive labels.*click_is_positive"):
        resolve_world({"source": "file", "path": str(once), "mapping": SESSION_CLICKS_MAPPING,
                       "labels": {"click_is_positive": False, "attribution_window_hours": 1}})
    with pytest.raises(WorldError, match=r"too few labeled impressions in \{'validation'"):
        resolve_world({**spec, "split": {"validation_days": 0.0001, "test_days": 7}})
    with pytest.raises(WorldError, match="needs `path`"):
        resolve_world({"source": "movielens-1m"})


def test_movielens_100k_world_splits_like_the_catalog_evaluation() -> None:
    """`kairos demo --source movielens-100k` trains and gates on the split the quality figures are measured on
    (the last 20% of labeled rows), not on a second, hand-sized window."""
    from assets.features import TrainingSetConfig
    from orchestration.world import KNOWN_SPLITS, SPLIT_KEYS

    assert SPLIT_KEYS == set(TrainingSetConfig.model_fields)  # a world's split is exactly the asset's config
    from tests.conftest import movielens_or_skip

    path = str(movielens_or_skip())
    world = resolve_world({"source": "movielens-100k", "path": path})
    assert world.ops["training_set"]["config"] == KNOWN_SPLITS["movielens-100k"]
    assert world.ops["training_set"]["config"]["test_quantile"] == 0.8
    s = world.summary
    total = s["train_impressions"] + s["validation_impressions"] + s["test_impressions"]
    assert abs(s["test_impressions"] / total - 0.2) < 0.01 and s["validation_impressions"] > 0
    assert "last 20% of labeled rows" in world.describe()
    with pytest.raises(WorldError, match=r"unknown split key\(s\) \['test_weeks'\]"):
        resolve_world({"source": "movielens-100k", "path": path, "split": {"test_weeks": 4}})


def test_derive_split_takes_the_last_tenths_in_whole_days() -> None:
    ts = np.arange(0, 100 * DAY_MS, DAY_MS // 10)  # ten impressions a day for 100 days
    split = derive_split(ts)
    assert split == {"validation_days": 10.0, "test_days": 10.0, "gap_hours": 0.0}
    assert derive_split(np.array([0, 1000, 2000]))["test_days"] == 1.0  # never below a day


def test_demo_refuses_a_bad_world_before_any_dagster_run(tmp_path: Path, monkeypatch) -> None:
    from orchestration.cli import main

    monkeypatch.delenv("KAIROS_PARTITION_START", raising=False)
    monkeypatch.setenv("KAIROS_HOME", str(tmp_path / "home"))
    latin = tmp_path / "latin.csv"
    latin.write_bytes("uid;sku;ts\nu1;Caf\u00e9;1000\n".encode("latin-1"))
    with pytest.raises(SystemExit, match=re.escape(f"kairos demo: {latin}: line 2, column 'sku'")):
        main(["demo", "--source", "file", "--path", str(latin), "--mapping",
              '{"user": "uid", "item": "sku", "timestamp": "ts"}'])
    with pytest.raises(SystemExit, match="movielens-1m' needs `path`"):
        main(["demo", "--source", "movielens-1m"])
    world = tmp_path / "world.yaml"
    world.write_text("source: file\npath: latin.csv\nmapping: {user: uid, item: sku, timestamp: ts}\nsplt: {}\n")
    with pytest.raises(SystemExit, match=r"unknown key\(s\) \['splt'\]"):
        main(["demo", "--config", str(world)])
    assert not (tmp_path / "home" / "dagster").exists()  # refused before any run was started
