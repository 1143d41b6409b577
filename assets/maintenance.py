"""Lake maintenance: compact small files (OPTIMIZE) and delete unreferenced ones (VACUUM).

Daily partitioned appends leave many small files; compaction keeps Spark and delta-rs
reads fast. VACUUM only removes files older than the retention window, so time travel
to any version a model was trained on within that window keeps working (a training
run's pinned versions are in its MLflow tags; keep retention longer than the oldest
model you may need to rebuild).
"""

import time

from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset

from compliance.versions import source_version
from assets.resources import LakeResource


class MaintenanceConfig(Config):
    retention_hours: int = 168
    tables: list[str] = []   # empty: every table in the lake
    dry_run: bool = False


@asset(group_name="maintenance", code_version=source_version(__file__, "lake/delta.py"),
       description="OPTIMIZE (compact) and VACUUM every Delta table in the lake. It reads no table's content, so it "
                   "declares no upstream assets (it runs on its own schedule, not when data changes).")
def lake_maintenance(context: AssetExecutionContext, config: MaintenanceConfig, lake: LakeResource) -> MaterializeResult:
    store = lake.lake()
    tables = config.tables or store.tables()
    report = {}
    t0 = time.perf_counter()
    for table in tables:
        if not store.exists(table):
            context.log.warning(f"{table}: no such Delta table, skipped")
            continue
        before = len(store.files(table, store.version(table)))
        compacted = {} if config.dry_run else store.optimize(table)
        removed = store.vacuum(table, retention_hours=config.retention_hours, dry_run=config.dry_run)
        after = len(store.files(table, store.version(table)))
        report[table] = {"files_before": before, "files_after": after,
                         "files_added": int(compacted.get("numFilesAdded", 0)),
                         "files_removed_by_optimize": int(compacted.get("numFilesRemoved", 0)),
                         "files_vacuumed": len(removed), "version": store.version(table)}
        context.log.info(f"{table}: {before} -> {after} live files, {len(removed)} old files vacuumed")
    return MaterializeResult(metadata={
        "tables": len(report), "seconds": round(time.perf_counter() - t0, 2), "dry_run": config.dry_run,
        "retention_hours": config.retention_hours, "report": MetadataValue.json(report),
        "files_vacuumed": sum(r["files_vacuumed"] for r in report.values()),
    })
