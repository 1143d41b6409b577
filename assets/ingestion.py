"""Ingestion assets: sources → bronze events and catalog → contract → silver events → labels."""

import time
from pathlib import Path

import pandas as pd
from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, AssetSpec,
                     Config, MaterializeResult, MetadataValue, asset, multi_asset)

from ingestion.schema import EVENT_SCHEMA, ITEM_SCHEMA, USER_SCHEMA
from orchestration.resources import ArtifactsResource, LakeResource
from orchestration.settings import Settings

BRONZE = "bronze_events"
SILVER = "silver_events"
QUARANTINE = "quarantine_events"
ITEMS = "catalog_items"
USERS = "catalog_users"
LABELS = "labels"


class SourceConfig(Config):
    """Where events come from: the seeded simulator (default) or MovieLens 100K."""

    source: str = "simulator"
    n_users: int = 300
    n_items: int = 400
    n_categories: int = 8
    days: int = 14
    seed: int = 7
    shift_day: int = -1
    movielens_dir: str = ""


def load_source(config: SourceConfig) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """events, items, users from the configured source."""
    if config.source == "simulator":
        from ingestion.simulator import SimulatorConfig, simulate

        world = simulate(SimulatorConfig(n_users=config.n_users, n_items=config.n_items, n_categories=config.n_categories,
                                         days=config.days, seed=config.seed,
                                         shift_day=config.shift_day if config.shift_day >= 0 else None))
        return world.events, world.items, world.users
    if config.source == "movielens-100k":
        from ingestion.movielens import load_movielens_100k

        path = Path(config.movielens_dir) if config.movielens_dir else Settings.from_env().movielens_100k_dir
        return load_movielens_100k(path)
    raise ValueError(f"unknown source '{config.source}': use 'simulator' or 'movielens-100k'")


@multi_asset(
    specs=[
        AssetSpec(BRONZE, group_name="ingestion", description="Raw events as received (Delta, append-only history by version)."),
        AssetSpec(ITEMS, group_name="ingestion", description="Item catalog: id, title, category, tags, publish time."),
        AssetSpec(USERS, group_name="ingestion", description="User profiles: segment, device, region, signup time."),
    ],
)
def source_events(context: AssetExecutionContext, config: SourceConfig, lake: LakeResource):
    """Bring a batch of events and the catalog into the lake."""
    t0 = time.perf_counter()
    events, items, users = load_source(config)
    store = lake.lake()
    batch_id = f"{config.source}-seed{config.seed}-{len(events)}"
    ev = store.write(BRONZE, events, schema=EVENT_SCHEMA, commit_properties={"batch_id": batch_id, "run_id": context.run_id})
    it = store.write(ITEMS, items, schema=ITEM_SCHEMA)
    us = store.write(USERS, users, schema=USER_SCHEMA)
    context.log.info(f"ingested {ev.rows} events, {it.rows} items, {us.rows} users in {time.perf_counter() - t0:.1f}s")
    yield MaterializeResult(asset_key=BRONZE, metadata={"rows": ev.rows, "delta_version": ev.version, "batch_id": batch_id,
                                                        "source": config.source})
    yield MaterializeResult(asset_key=ITEMS, metadata={"rows": it.rows, "delta_version": it.version})
    yield MaterializeResult(asset_key=USERS, metadata={"rows": us.rows, "delta_version": us.version})


@asset(
    deps=[BRONZE],
    group_name="ingestion",
    check_specs=[AssetCheckSpec("events_contract", asset=SILVER), AssetCheckSpec("counts_reconcile", asset=SILVER)],
    description="Events that passed the Great Expectations contract, deduplicated; rejects go to quarantine with reasons.",
)
def silver_events(context: AssetExecutionContext, lake: LakeResource, artifacts: ArtifactsResource):
    from data_contracts.events import build_data_docs, validate_events

    store = lake.lake()
    pin = store.pin(BRONZE)
    raw = store.read(BRONZE, version=pin.version)
    result = validate_events(raw, run_id=context.run_id)
    out = store.write(SILVER, result.accepted, schema=EVENT_SCHEMA)
    if len(result.quarantined):
        store.write(QUARANTINE, result.quarantined, mode="append")
    docs = build_data_docs(result, artifacts.path("data_docs", context.run_id))
    summary = result.summary()
    quarantine_rate = len(result.quarantined) / max(result.n_in, 1)
    yield MaterializeResult(metadata={
        **{k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))},
        "bronze_version": pin.version, "delta_version": out.version, "quarantine_rate": round(quarantine_rate, 5),
        "expectation_failures": MetadataValue.json(result.expectation_failures),
        "data_docs": MetadataValue.path(str(docs)),
    })
    yield AssetCheckResult(
        check_name="events_contract", passed=quarantine_rate <= 0.05, severity=AssetCheckSeverity.WARN,
        metadata={"quarantined": len(result.quarantined), "quarantine_rate": round(quarantine_rate, 5),
                  "suite_success": result.success, "failures_by_expectation": MetadataValue.json(result.expectation_failures)},
        description="At most 5% of events may be quarantined; per-expectation failure counts attached.",
    )
    yield AssetCheckResult(
        check_name="counts_reconcile", passed=result.reconciles(),
        metadata={"in": result.n_in, "accepted": len(result.accepted), "quarantined": len(result.quarantined),
                  "duplicates": result.duplicates},
        description="in = accepted + quarantined + duplicates",
    )


@asset(deps=[SILVER], group_name="ingestion",
       description="One row per impression whose attribution window closed: weighted engagement label and binary label.")
def labels(context: AssetExecutionContext, lake: LakeResource) -> MaterializeResult:
    from training.labels import LabelConfig, build_labels

    store = lake.lake()
    pin = store.pin(SILVER)
    events = store.read(SILVER, version=pin.version)
    as_of = int(events["timestamp"].max()) + 1
    lab = build_labels(events, as_of_ms=as_of, config=LabelConfig())
    out = store.write(LABELS, lab)
    return MaterializeResult(metadata={
        "rows": len(lab), "positives": int(lab["label_binary"].sum()), "positive_rate": round(float(lab["label_binary"].mean()), 4),
        "silver_version": pin.version, "delta_version": out.version, "as_of_ms": as_of,
    })
