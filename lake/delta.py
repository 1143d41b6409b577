"""Delta Lake adapter: every table write and read in Kairos goes through `DeltaLake`.

Tables are written with delta-rs (`deltalake`), which needs no JVM jars, to a local folder or an
object store (s3://, gs://, az://, abfss://; credentials from the usual AWS_* / GOOGLE_* / AZURE_*
environment, or KAIROS_LAKE_STORAGE_OPTIONS). Spark reads a pinned snapshot of a table with
`lake.spark.spark_read` (delta-rs on the executors, Hadoop parquet, or the delta-spark connector).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError

from ground.settings import LakeStorageSettings

log = logging.getLogger("kairos.lake")


class TableMissing(LookupError):
    """A table was read before any asset wrote it."""


def storage_options_from_env() -> dict[str, str]:
    """KAIROS_LAKE_STORAGE_OPTIONS: a JSON object of delta-rs storage options (endpoint, region, ...), for
    settings the standard AWS_* / GOOGLE_* / AZURE_* environment does not cover (ground.settings.LakeStorageSettings
    reads and checks it)."""
    return dict(LakeStorageSettings.from_env().options)


@dataclass(frozen=True)
class TableVersion:
    table: str
    version: int
    rows: int

    def as_tag(self) -> dict[str, str]:
        return {f"delta.{self.table}.version": str(self.version), f"delta.{self.table}.rows": str(self.rows)}


@dataclass(frozen=True)
class BatchWrite(TableVersion):
    batch_id: str = ""
    content_hash: int = 0
    skipped: bool = False


def content_hash(arrow: pa.Table, columns: list[str] | None = None) -> int:
    """A stable 63-bit hash of a table's rows (order-insensitive), over `columns` (default: all)."""
    frame = arrow.select(columns or arrow.column_names).to_pandas()
    if frame.empty:
        return 1
    rows = pd.util.hash_pandas_object(frame, index=False).to_numpy().astype("uint64")
    total = int(rows.sum(dtype="uint64")) ^ (len(frame) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF)
    return (total & 0x7FFFFFFFFFFFFFFF) or 1


def _filter_expression(schema: pa.Schema, filters: list[tuple]) -> Any:
    """A conjunction of (column, op, value) filters as a pyarrow expression, each column cast to `schema`'s type."""
    import operator

    import pyarrow.dataset as ds

    ops = {"=": operator.eq, "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
           ">": operator.gt, ">=": operator.ge}
    expr = None
    for column, op, value in filters:
        field = ds.field(column).cast(schema.field(column).type)
        if op in ops:
            term = ops[op](field, value)
        elif op in ("in", "not in"):
            term = field.isin(list(value)) if op == "in" else ~field.isin(list(value))
        else:
            raise ValueError(f"unsupported filter operator {op!r} on {column}")
        expr = term if expr is None else expr & term
    return expr


def day_hashes(arrow: pa.Table, day_column: str, columns: list[str] | None = None) -> dict[str, int]:
    """`content_hash` of each day's rows (same value as hashing that day's slice alone), in one pass."""
    import numpy as np

    frame = arrow.select(columns or arrow.column_names).to_pandas()
    days = arrow.column(day_column).to_numpy(zero_copy_only=False).astype(object)
    if frame.empty:
        return {}
    rows = pd.util.hash_pandas_object(frame, index=False).to_numpy().astype("uint64")
    order = np.argsort(days, kind="stable")
    sorted_days = days[order]
    starts = np.flatnonzero(np.r_[True, sorted_days[1:] != sorted_days[:-1]])
    sums = np.add.reduceat(rows[order], starts)  # uint64: wraps exactly like content_hash's sum
    counts = np.diff(np.r_[starts, len(rows)])
    out = {}
    for day, total, n in zip(sorted_days[starts], sums, counts):
        mixed = int(total) ^ (int(n) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF)
        out[str(day)] = (mixed & 0x7FFFFFFFFFFFFFFF) or 1
    return out


class DeltaLake:
    """A folder (or object-store prefix) of named Delta tables."""

    def __init__(self, root: str, storage_options: dict[str, str] | None = None) -> None:
        self.root = root.rstrip("/")
        options = storage_options if storage_options is not None else storage_options_from_env()
        self.storage_options: dict[str, str] | None = options or None
        if "://" not in self.root:
            os.makedirs(self.root, exist_ok=True)

    @property
    def is_object_store(self) -> bool:
        return "://" in self.root and not self.root.startswith("file://")

    def uri(self, table: str) -> str:
        return f"{self.root}/{table}"

    def tables(self) -> list[str]:
        """Names of the Delta tables under the root: every direct child that has a `_delta_log`.

        An object store is listed through delta-rs' own object store (the credentials it writes with):
        one delimiter listing of the root, then one of each child's `_delta_log/`.
        """
        if not self.is_object_store:
            return sorted(p.parent.name for p in Path(self.root).glob("*/_delta_log"))
        import pyarrow.fs as pafs
        from deltalake.fs import DeltaStorageHandler

        fs = pafs.PyFileSystem(DeltaStorageHandler(self.root, self.storage_options))
        children = [i.path.rstrip("/").rsplit("/", 1)[-1]
                    for i in fs.get_file_info(pafs.FileSelector("", allow_not_found=True, recursive=False))
                    if i.type == pafs.FileType.Directory]
        return sorted(c for c in children
                      if fs.get_file_info(pafs.FileSelector(f"{c}/_delta_log", allow_not_found=True, recursive=False)))

    def exists(self, table: str) -> bool:
        try:
            DeltaTable(self.uri(table), storage_options=self.storage_options)
            return True
        except TableNotFoundError:
            return False

    def _table(self, table: str, version: int | None = None) -> DeltaTable:
        try:
            return DeltaTable(self.uri(table), version=version, storage_options=self.storage_options)
        except TableNotFoundError as exc:
            raise TableMissing(
                f"Delta table '{table}' does not exist at {self.uri(table)}: materialize its asset first "
                f"(for example `kairos demo`, or the Dagster UI)."
            ) from exc

    def version(self, table: str) -> int:
        return int(self._table(table).version())

    def write(self, table: str, data: pd.DataFrame | pa.Table, mode: Literal["overwrite", "append"] = "overwrite",
              schema: pa.Schema | None = None, partition_by: list[str] | None = None,
              commit_properties: dict[str, Any] | None = None) -> TableVersion:
        """Write a frame as a new table version and return that version."""
        arrow = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, schema=schema, preserve_index=False)
        if schema is not None and isinstance(data, pa.Table):
            arrow = arrow.select(schema.names).cast(schema)
        kwargs: dict[str, Any] = {"mode": mode, "partition_by": partition_by, "storage_options": self.storage_options}
        if mode == "overwrite":
            kwargs["schema_mode"] = "overwrite"
        if commit_properties:
            from deltalake import CommitProperties
            kwargs["commit_properties"] = CommitProperties(custom_metadata={k: str(v) for k, v in commit_properties.items()})
        write_deltalake(self.uri(table), arrow, **kwargs)
        version = self.version(table)
        log.info("wrote %s rows to %s (mode=%s) -> version %s", arrow.num_rows, table, mode, version)
        return TableVersion(table, version, arrow.num_rows)

    def write_batch(self, table: str, data: pd.DataFrame | pa.Table, batch_id: str, replace_where: str,
                    schema: pa.Schema | None = None, partition_by: list[str] | None = None,
                    content_columns: list[str] | None = None,
                    commit_properties: dict[str, Any] | None = None) -> BatchWrite:
        """Idempotently replace one batch (the rows matching `replace_where`) with `data`.

        Replaying a batch is a no-op: the content hash is stored as a Delta app transaction
        (`app_id = batch:<batch_id>`), so identical content writes no new version, and changed
        content (a corrected backfill) replaces exactly the old batch's rows, never duplicating them.
        """
        arrow = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, schema=schema, preserve_index=False)
        if schema is not None:
            arrow = arrow.select(schema.names).cast(schema)
        digest = content_hash(arrow, content_columns)
        app_id = f"batch:{batch_id}"
        exists = self.exists(table)
        previous = self._table(table).transaction_version(app_id) if exists else None
        if exists and (previous == digest or (previous is None and arrow.num_rows == 0)):
            # unchanged, or an empty batch that never had rows: nothing to replace
            version = self.version(table)
            log.info("%s batch %s unchanged (hash %s): no new version, still v%s", table, batch_id, digest, version)
            return BatchWrite(table, version, arrow.num_rows, batch_id, digest, skipped=True)
        version = self._replace(table, arrow, replace_where if exists else None, partition_by, {app_id: digest},
                                {"batch_id": batch_id, **(commit_properties or {})})
        log.info("%s batch %s: %s rows -> version %s", table, batch_id, arrow.num_rows, version)
        return BatchWrite(table, version, arrow.num_rows, batch_id, digest, skipped=False)

    def _replace(self, table: str, arrow: pa.Table, predicate: str | None, partition_by: list[str] | None,
                 app_transactions: dict[str, int], metadata: dict[str, Any]) -> int:
        """One commit: replace the rows matching `predicate` (None: append to a new table), recording the batches."""
        from deltalake import CommitProperties, Transaction

        props = CommitProperties(custom_metadata={k: str(v) for k, v in metadata.items()},
                                 app_transactions=[Transaction(a, d) for a, d in app_transactions.items()])
        if predicate is not None:
            write_deltalake(self.uri(table), arrow, mode="overwrite", predicate=predicate, partition_by=partition_by,
                            storage_options=self.storage_options, commit_properties=props)
        else:
            write_deltalake(self.uri(table), arrow, mode="append", partition_by=partition_by,
                            storage_options=self.storage_options, commit_properties=props)
        return self.version(table)

    def write_day_batches(self, table: str, data: pd.DataFrame | pa.Table, days: list[str], day_column: str,
                          schema: pa.Schema | None = None, partition_by: list[str] | None = None,
                          content_columns: list[str] | None = None,
                          commit_properties: dict[str, Any] | None = None) -> BatchWrite:
        """Replace the rows of consecutive days `days` (one batch per day) in ONE commit.

        Each day keeps its own app transaction (`batch:<table>:<day>`, the id `write_batch` uses for a
        one-day batch), so replaying a range, or any day of it alone, stays a no-op when its content is
        unchanged; a range with any changed day rewrites the range. Backfilling years of history thus
        costs a few commits, not one per calendar day.
        """
        arrow = data if isinstance(data, pa.Table) else pa.Table.from_pandas(data, schema=schema, preserve_index=False)
        if schema is not None:
            arrow = arrow.select(schema.names).cast(schema)
        hashes = day_hashes(arrow, day_column, content_columns)
        exists = self.exists(table)
        dt = self._table(table) if exists else None
        digests = {day: hashes.get(day, 1) for day in days}
        previous = {day: dt.transaction_version(f"batch:{table}:{day}") for day in days} if dt is not None else {}
        batch_id = f"{table}:{days[0]}..{days[-1]}"
        if exists and all(previous[d] == digests[d] or (previous[d] is None and d not in hashes) for d in days):
            version = self.version(table)
            log.info("%s batches %s unchanged: no new version, still v%s", table, batch_id, version)
            return BatchWrite(table, version, arrow.num_rows, batch_id, 0, skipped=True)
        predicate = f"{day_column} >= '{days[0]}' AND {day_column} <= '{days[-1]}'" if exists else None
        if dt is not None:  # a table keeps the partitioning it was created with
            partition_by = list(dt.metadata().partition_columns) or None
        version = self._replace(table, arrow, predicate, partition_by,
                                {f"batch:{table}:{d}": digests[d] for d in days},
                                {"batch_id": batch_id, "days": len(days), **(commit_properties or {})})
        log.info("%s batches %s: %s rows -> version %s", table, batch_id, arrow.num_rows, version)
        return BatchWrite(table, version, arrow.num_rows, batch_id, 0, skipped=False)

    def read(self, table: str, version: int | None = None, columns: list[str] | None = None,
             filters: list[tuple] | None = None) -> pd.DataFrame:
        return self.read_arrow(table, version, columns, filters).to_pandas()

    def columns(self, table: str, version: int | None = None) -> list[str]:
        """The table's column names at `version` (from the Delta log, no data file read)."""
        return [f.name for f in self._table(table, version).schema().fields]

    def read_arrow(self, table: str, version: int | None = None, columns: list[str] | None = None,
                   filters: list[tuple] | None = None) -> pa.Table:
        dt = self._table(table, version)
        try:
            return dt.to_pyarrow_table(columns=columns, filters=filters)
        except pa.ArrowNotImplementedError:
            if not filters:
                raise
            # files rewritten by delta-rs (delete, optimize) store strings as string_view beside plain-string files
            # of later appends, and a plain filter then has no kernel for the mix: compare each column cast to the
            # table's type instead (same rows; used only when the fast path fails)
            dataset = dt.to_pyarrow_dataset()
            return dataset.to_table(columns=columns, filter=_filter_expression(dataset.schema, filters))

    def pin(self, table: str) -> TableVersion:
        """The current version of a table and its row count: what a run records it read."""
        dt = self._table(table)
        actions = pa.table(dt.get_add_actions(flatten=True))  # arro3 table -> pyarrow (Arrow C stream)
        rows = int(pa.compute.sum(actions.column("num_records")).as_py() or 0) if actions.num_rows else 0
        return TableVersion(table, int(dt.version()), rows)

    def count_rows(self, table: str, column: str, values: list[str]) -> int:
        """Rows whose `column` is in `values`, from file statistics where they decide it (partition values,
        or a file whose min == max), reading only the undecided files: years of day-partitioned history
        are thousands of files, and opening each to count would cost per calendar day."""
        dt = self._table(table)
        actions = pa.table(dt.get_add_actions(flatten=True))
        if actions.num_rows == 0:
            return 0
        wanted = set(values)
        names = actions.column_names
        part = f"partition.{column}"
        if part in names:
            keys = actions.column(part).to_pylist()
            counts = actions.column("num_records").to_pylist()
            return int(sum(n for k, n in zip(keys, counts) if k in wanted))
        lo = actions.column(f"min.{column}").to_pylist() if f"min.{column}" in names else [None] * actions.num_rows
        hi = actions.column(f"max.{column}").to_pylist() if f"max.{column}" in names else [None] * actions.num_rows
        counts = actions.column("num_records").to_pylist()
        paths = actions.column("path").to_pylist()
        total, undecided = 0, []
        first, last = min(wanted), max(wanted)
        for path, a, b, n in zip(paths, lo, hi, counts):
            if a is None or b is None:
                undecided.append(path)
            elif b < first or a > last:
                continue
            elif a == b:
                total += n if a in wanted else 0
            else:
                undecided.append(path)
        if undecided:
            import pyarrow.dataset as ds

            base = self.uri(table)
            files = [f"{base}/{path}" for path in undecided]
            col = ds.dataset(files, format="parquet").to_table(columns=[column]).column(column)
            total += int(pa.compute.sum(pa.compute.is_in(col, value_set=pa.array(sorted(wanted)))).as_py() or 0)
        return total

    def files(self, table: str, version: int) -> list[str]:
        return list(self._table(table, version).file_uris())

    def history(self, table: str, limit: int = 20) -> list[dict[str, Any]]:
        return self._table(table).history(limit)

    def delete(self, table: str, predicate: str) -> dict[str, Any]:
        return self._table(table).delete(predicate)

    def vacuum(self, table: str, retention_hours: int = 168, dry_run: bool = False) -> list[str]:
        return self._table(table).vacuum(retention_hours=retention_hours, dry_run=dry_run, enforce_retention_duration=False)

    def optimize(self, table: str) -> dict[str, Any]:
        return self._table(table).optimize.compact()


def spark_read(spark: Any, lake: DeltaLake, table: str, version: int, native: bool | None = None) -> Any:
    """A Spark DataFrame of exactly `table@version` (see `lake.spark.spark_read`; `native=True` = delta-spark)."""
    from lake.spark_read import spark_read as read

    return read(spark, lake, table, version, reader="delta" if native else None)
