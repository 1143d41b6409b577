"""Generic interaction-log importer: any CSV/TSV/Parquet log + a column mapping -> Kairos events and catalogs.

Public data sets and partner exports each name their columns differently; a
`ColumnMapping` says which column is the user, the item, the time and (optionally)
the session, event type, rating-like value and device, so one importer covers them
all. The rules follow the MovieLens importer so that models and labels behave the
same on every source:

* no session column -> a user's rows are split into sessions at 30-minute gaps;
* a value column (and no event-type column) -> each row becomes an impression and,
  one second later, a long click / short click / skip by `value_thresholds`;
* an event-type column -> values are lower-cased and kept even when unknown, so
  the event contract quarantines them with a reason instead of the importer
  silently dropping them;
* event ids are uuid5 of (user, item, timestamp, event type, row number): a
  re-import yields identical ids, so downstream dedup makes re-imports idempotent;
* a log without impressions (click-only, or views/purchases) gets one impression one
  second before the first engagement of each (session, item): labels are per
  impression, so every supported log yields something to label (see `log_kind`);
* an empty user cell with a session column becomes the session-scoped identity
  `anon:<session>` (`anonymous_users="session"`, the default), so anonymous sessions
  are served by session state; `anonymous_users="quarantine"` keeps them null and the
  contract quarantines them with a reason;
* the delimiter is sniffed from the header line (, ; TAB |) unless given; the text is
  decoded with `encoding` (default utf-8, BOM tolerated), and an undecodable byte or a
  binary file is an error naming the file, line and column.

Bad input raises `ImportError_` naming the file, the line (CSV, counting the
header) or row (Parquet), the column, the value and what to do about it.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ingestion.movielens import SESSION_GAP_MS, ImportError_
from data_contracts.schema import EVENT_COLUMNS, EVENT_TYPES, ITEM_SCHEMA, SCHEMA_VERSION, USER_SCHEMA

TIMESTAMP_UNITS: tuple[str, ...] = ("s", "ms", "iso")
OFFSET_UNITS: tuple[str, ...] = ("s", "ms")
ANONYMOUS_RULES: tuple[str, ...] = ("session", "quarantine")
# delimiter used when the header line holds none of the candidates (a one-column file)
CSV_SUFFIXES: dict[str, str] = {".csv": ",", ".tsv": "\t", ".txt": ",", ".dat": ","}
DELIMITER_CANDIDATES: tuple[str, ...] = (",", ";", "\t", "|")
ANON_PREFIX = "anon:"
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet", ".pq")
# Same shape as the MovieLens rule: value >= long -> 45 s click, >= short -> 3 s click, else skip.
LONG_CLICK_DWELL_MS = 45_000
SHORT_CLICK_DWELL_MS = 3_000
OUTCOME_DELAY_MS = 1_000
# Own namespace: ids of a generic import never collide with MovieLens-import ids for the same key.
_NS = uuid.UUID("0b8e7a52-3c1d-5f3e-9a43-1f2d6c0e9b71")
# |epoch ms| beyond this is not a real clock reading and would overflow int64 arithmetic.
_MAX_ABS_MS = 2**62
# Internal bookkeeping columns (cannot clash with a mapped column: those are checked first).
_FILE, _ROW, _POS = "__kairos_file", "__kairos_row", "__kairos_pos"

Frames = tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]


@dataclass(frozen=True)
class ColumnMapping:
    """Which source column plays which part of a Kairos event (frozen: safe to share as config)."""

    user: str
    item: str
    timestamp: str
    session: str | None = None
    event_type: str | None = None
    value: str | None = None
    device: str | None = None
    timestamp_unit: str = "s"
    default_event_type: str = "click"
    value_thresholds: tuple[float, float] = (4.0, 3.0)  # (long click at >=, short click at >=); below -> skip
    timestamp_offset: str | None = None   # composite time: timestamp (e.g. a date) + this column
    timestamp_offset_unit: str = "ms"
    delimiter: str | None = None          # None: sniffed from the header line
    encoding: str = "utf-8"
    anonymous_users: str = "session"      # empty user + session -> "anon:<session>"; or "quarantine"
    event_type_map: dict[str, str] | None = None  # source value -> Kairos event type, e.g. {"view": "click"}

    def __post_init__(self) -> None:
        # Config mistakes fail here, before any file is read, with the fix in the message.
        for name in ("user", "item", "timestamp"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"ColumnMapping.{name} must name a column (non-empty string), "
                                 f"got {getattr(self, name)!r}")
        for name in ("session", "event_type", "value", "device", "timestamp_offset"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"ColumnMapping.{name} must be a column name or null, got {v!r}")
        if self.timestamp_unit not in TIMESTAMP_UNITS:
            raise ValueError(f"ColumnMapping.timestamp_unit must be one of {list(TIMESTAMP_UNITS)}, "
                             f"got {self.timestamp_unit!r}")
        if self.timestamp_offset_unit not in OFFSET_UNITS:
            raise ValueError(f"ColumnMapping.timestamp_offset_unit must be one of {list(OFFSET_UNITS)}, "
                             f"got {self.timestamp_offset_unit!r}")
        if self.anonymous_users not in ANONYMOUS_RULES:
            raise ValueError(f"ColumnMapping.anonymous_users must be one of {list(ANONYMOUS_RULES)}, "
                             f"got {self.anonymous_users!r}")
        if self.delimiter is not None and (not isinstance(self.delimiter, str) or len(self.delimiter) != 1):
            raise ValueError(f"ColumnMapping.delimiter must be one character (e.g. ';' or '\\t') or null to sniff "
                             f"it, got {self.delimiter!r}")
        _check_encoding(self.encoding)
        if self.event_type_map is not None:
            if not isinstance(self.event_type_map, Mapping):
                raise ValueError(f"ColumnMapping.event_type_map must be an object {{source value: event type}}, "
                                 f"got {self.event_type_map!r}")
            bad = {k: v for k, v in self.event_type_map.items() if v not in EVENT_TYPES}
            if bad:
                raise ValueError(f"ColumnMapping.event_type_map maps to unknown event type(s) {bad}; "
                                 f"use one of {list(EVENT_TYPES)}")
            object.__setattr__(self, "event_type_map", {str(k).lower(): v for k, v in self.event_type_map.items()})
        if self.default_event_type not in EVENT_TYPES:
            raise ValueError(f"ColumnMapping.default_event_type must be one of {list(EVENT_TYPES)}, "
                             f"got {self.default_event_type!r}")
        if self.event_type is not None and self.value is not None:
            raise ValueError("map either event_type (events as logged) or value (ratings turned into "
                             "impression + click/skip), not both")
        thresholds = tuple(self.value_thresholds)
        if (len(thresholds) != 2 or not all(isinstance(t, (int, float)) and not isinstance(t, bool)
                                            for t in thresholds) or thresholds[0] < thresholds[1]):
            raise ValueError("ColumnMapping.value_thresholds must be two numbers [long_click_at, short_click_at] "
                             f"with long_click_at >= short_click_at, got {self.value_thresholds!r}")
        object.__setattr__(self, "value_thresholds", (float(thresholds[0]), float(thresholds[1])))

    @classmethod
    def allowed_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ColumnMapping:
        """Build from a plain dict (Dagster/CLI config); unknown or missing keys are config errors."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a column mapping must be a JSON object / dict, got {type(data).__name__}")
        allowed = cls.allowed_keys()
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"unknown column-mapping key(s) {unknown}; allowed keys are {allowed}")
        missing = [k for k in ("user", "item", "timestamp") if k not in data]
        if missing:
            raise ValueError(f"column mapping lacks required key(s) {missing}; allowed keys are {allowed}")
        kwargs = dict(data)
        if "value_thresholds" in kwargs and isinstance(kwargs["value_thresholds"], list):
            kwargs["value_thresholds"] = tuple(kwargs["value_thresholds"])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> ColumnMapping:
        """Build from a JSON object string, e.g. '{"user": "uid", "item": "sku", "timestamp": "ts"}'."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"column mapping is not valid JSON ({exc}); expected an object with keys "
                             f"{cls.allowed_keys()}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["value_thresholds"] = list(self.value_thresholds)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def columns(self) -> list[str]:
        """The source columns this mapping reads, in a stable order without repeats."""
        cols = [self.user, self.item, self.timestamp, self.timestamp_offset, self.session, self.event_type,
                self.value, self.device]
        return list(dict.fromkeys(c for c in cols if c is not None))

    def log_kind(self) -> str:
        """Which label rule the log follows (see ingestion.sources.LABEL_RULES): ratings, events or clicks."""
        if self.value is not None:
            return "ratings"
        return "events" if self.event_type is not None else "clicks"


def _check_encoding(encoding: str) -> None:
    import codecs

    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError) as exc:
        raise ValueError(f"unknown text encoding {encoding!r}; use e.g. 'utf-8', 'latin-1' or 'cp1252'") from exc


# --------------------------------------------------------------------------- reading
def _where(frame: pd.DataFrame, pos: int) -> str:
    """'<file>: line N' for CSV or '<file>: row N' for Parquet, for the frame row at `pos`."""
    return f"{frame[_FILE].iloc[pos]}: {frame['__kairos_kind'].iloc[pos]} {int(frame[_ROW].iloc[pos])}"


def _check_header(columns: list[str], wanted: list[str], file: Path, header: str) -> None:
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ImportError_(f"{file}: {header} lacks mapped column(s) {missing}; columns present: {list(columns)}. "
                           "Fix the column mapping (or the file) so every mapped column exists")


def sniff_delimiter(header_line: str, default: str) -> str:
    """The candidate (, ; TAB |) that occurs most often in the header line; `default` when none does."""
    counts = {d: header_line.count(d) for d in DELIMITER_CANDIDATES}
    best = max(DELIMITER_CANDIDATES, key=lambda d: counts[d])
    return best if counts[best] else default


def decode_text(path: Path, data: bytes, encoding: str, delimiter: str | None) -> str:
    """The file's text; a NUL byte (binary file) or an undecodable byte raises naming line and column."""
    nul = data.find(b"\0")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise ImportError_(f"{path}: line {line} holds a NUL byte (byte offset {nul}): this is a binary file, not "
                           "delimited text; export the log as CSV/TSV, or give a Parquet file a .parquet suffix")
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        start = int(exc.start)
        line_start = data.rfind(b"\n", 0, start) + 1
        line = data.count(b"\n", 0, start) + 1
        header = data.split(b"\n", 1)[0].decode(codec, errors="replace").rstrip("\r")
        sep = delimiter or sniff_delimiter(header, ",")
        field = data[line_start:start].count(sep.encode())
        names = header.split(sep)
        column = f"column '{names[field].strip()}'" if field < len(names) else f"field {field + 1}"
        raise ImportError_(f"{path}: line {line}, {column} (byte offset {start}): byte 0x{data[start]:02x} is not "
                           f"valid {encoding}; set the file's encoding (mapping key \"encoding\", CLI --encoding), "
                           "e.g. 'latin-1' or 'cp1252', or re-export the file as UTF-8") from exc


def read_delimited(path: Path, columns: list[str], delimiter: str | None, encoding: str) -> pd.DataFrame:
    """`columns` of a delimited text file as strings, plus its file-line bookkeeping (_ROW, __kairos_kind)."""
    import io

    text = decode_text(path, path.read_bytes(), encoding, delimiter)
    header = text.split("\n", 1)[0]
    sep = delimiter or sniff_delimiter(header, CSV_SUFFIXES.get(path.suffix.lower(), ","))
    kind = {",": "CSV", "\t": "TSV"}.get(sep, f"{sep!r}-delimited text")
    try:
        # dtype=str: ids keep leading zeros and bad numbers surface in our own checks, with line numbers;
        # skip_blank_lines=False keeps the row index aligned with file lines (blank rows are dropped below).
        raw = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, skip_blank_lines=False)
    except pd.errors.EmptyDataError as exc:
        raise ImportError_(f"{path}: the file is empty (no header line); expected a header with columns "
                           f"{columns} followed by one interaction per line") from exc
    except pd.errors.ParserError as exc:
        raise ImportError_(f"{path}: cannot be parsed as {kind} ({exc}); fix the quoting/field count on that "
                           "line (or set the delimiter) and import again") from exc
    raw.columns = [str(c).strip() for c in raw.columns]
    _check_header(list(raw.columns), columns, path, "line 1 (header)")
    raw = raw[columns]
    raw = raw[raw.notna().any(axis=1)]
    rows = raw.reset_index(drop=True)
    rows[_ROW] = (raw.index.to_numpy() + 2).astype("int64")  # 1-based, header is line 1
    return rows.assign(**{"__kairos_kind": "line"})


def read_parquet_file(file: Path, columns: list[str]) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as exc:  # pyarrow raises several types for non-parquet bytes
        raise ImportError_(f"{file}: cannot be read as Parquet ({exc}); check the file is a complete "
                           "Parquet file") from exc
    _check_header(table.column_names, columns, file, "schema (Parquet has no header line 1)")
    rows = table.select(columns).to_pandas()
    rows[_ROW] = np.arange(1, len(rows) + 1, dtype="int64")  # 1-based row within the file
    return rows.assign(**{"__kairos_kind": "row"})


def _read(path: Path, mapping: ColumnMapping) -> pd.DataFrame:
    """All mapped columns of the file (or parquet directory) plus file / line-or-row bookkeeping."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: point to a .csv, .tsv, .parquet/.pq file "
                                "or a directory of parquet files")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in PARQUET_SUFFIXES)
        if not files:
            raise ImportError_(f"{path}: directory holds no .parquet/.pq files; nothing to import")
        parts = []
        for f in files:
            part = read_parquet_file(f, mapping.columns())
            part[_FILE] = str(f)
            part["__kairos_key"] = str(f.relative_to(path))  # file identity inside the import, for event ids
            parts.append(part)
        frame = pd.concat(parts, ignore_index=True)
    else:
        suffix = path.suffix.lower()
        if suffix in CSV_SUFFIXES:
            frame = read_delimited(path, mapping.columns(), mapping.delimiter, mapping.encoding)
        elif suffix in PARQUET_SUFFIXES:
            frame = read_parquet_file(path, mapping.columns())
        else:
            raise ImportError_(f"{path}: unknown format {suffix!r}; use one of "
                               f"{sorted([*CSV_SUFFIXES, *PARQUET_SUFFIXES])} or a directory of parquet files")
        frame[_FILE] = str(path)
        frame["__kairos_key"] = ""  # a single file: ids do not depend on where the file lives
    if frame.empty:
        raise ImportError_(f"{path}: no interaction rows (only a header/schema); expected at least one row "
                           f"with columns {mapping.columns()}")
    return frame


# --------------------------------------------------------------------------- column parsing
def _ids(values: pd.Series) -> pd.Series:
    """Ids as strings; whole floats (ints widened by a null in Parquet) lose the '.0'; nulls stay null."""
    if pd.api.types.is_float_dtype(values):
        finite = values.dropna()
        if len(finite) and (finite == np.floor(finite)).all():
            values = values.astype("Int64")
    out = values.astype(object).where(values.notna(), None)
    out = out.map(lambda v: None if v is None else str(v).strip() or None)
    return out.astype(object)


def _bad_value(frame: pd.DataFrame, bad: np.ndarray, column: str, expected: str, fix: str) -> ImportError_:
    pos = int(np.flatnonzero(bad)[0])
    value = frame[column].iloc[pos]
    got = "an empty cell" if pd.isna(value) else repr(value)
    return ImportError_(f"{_where(frame, pos)}, column '{column}': expected {expected}, got {got}; {fix}")


def _number(frame: pd.DataFrame, column: str, expected: str, fix: str) -> pd.Series:
    """Float values of `column`; the first empty/non-numeric/non-finite cell raises with its line/row."""
    values = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    bad = ~np.isfinite(values.to_numpy())
    if bad.any():
        raise _bad_value(frame, bad, column, expected, fix)
    return values


_TZ_SUFFIX = r"\d:\d\d(?::\d\d(?:[.,]\d+)?)?\s*(?:[zZ]|[+-]\d\d(?::?\d\d)?)$"


def _parse_iso(text: pd.Series) -> pd.Series:
    """ISO-8601 strings -> UTC timestamps (NaT where unparseable); naive strings are read as UTC.

    Strings with and without an offset are parsed separately: pandas 2.x applies the offset of an
    earlier aware string to later naive ones when they are parsed together.
    """
    text = text.str.upper()  # pandas rejects a lower-case 't'/'z'
    aware = text.str.contains(_TZ_SUFFIX, regex=True, na=False).to_numpy()
    parsed = pd.Series(pd.NaT, index=text.index, dtype="datetime64[ns, UTC]")
    for mask in (aware, ~aware):
        if mask.any():
            parsed[mask] = pd.to_datetime(text[mask], errors="coerce", utc=True, format="ISO8601")
    return parsed


def _timestamps_ms(frame: pd.DataFrame, mapping: ColumnMapping) -> pd.Series:
    """Epoch milliseconds (int64, UTC) from seconds, milliseconds, ISO-8601 text or a native timestamp."""
    col = mapping.timestamp
    raw = frame[col]
    fix = ("fix or remove that line/row, or set timestamp_unit to match the column "
           f"(one of {list(TIMESTAMP_UNITS)}) and import again")
    if pd.api.types.is_datetime64_any_dtype(raw) or mapping.timestamp_unit == "iso":
        if pd.api.types.is_datetime64_any_dtype(raw):
            parsed = raw if raw.dt.tz is not None else raw.dt.tz_localize("UTC")
        else:
            text = raw.astype(object).where(raw.notna(), None).map(lambda v: None if v is None else str(v).strip())
            parsed = _parse_iso(text)
        bad = parsed.isna().to_numpy()
        if bad.any():
            raise _bad_value(frame, bad, col, "an ISO-8601 timestamp (e.g. '2024-05-01T12:30:00Z')", fix)
        ms = (parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "ms")
        return ms.astype("int64")
    scale = 1000.0 if mapping.timestamp_unit == "s" else 1.0
    unit_name = "epoch seconds" if mapping.timestamp_unit == "s" else "epoch milliseconds"
    numbers = pd.to_numeric(raw, errors="coerce").astype("float64")
    bad = ~np.isfinite(numbers.to_numpy())
    if bad.any():
        first = raw.iloc[int(np.flatnonzero(bad)[0])]
        if isinstance(first, str) and not _parse_iso(pd.Series([first], dtype=object)).isna().iloc[0]:
            fix = "the column holds ISO-8601 dates: set timestamp_unit='iso' in the column mapping and import again"
        raise _bad_value(frame, bad, col, f"a number ({unit_name})", fix)
    values = numbers * scale
    bad = (values.abs() > _MAX_ABS_MS).to_numpy()
    if bad.any():
        raise _bad_value(frame, bad, col, f"{unit_name} within the int64 millisecond range", fix)
    return np.round(values).astype("int64")


def _event_times_ms(frame: pd.DataFrame, mapping: ColumnMapping) -> pd.Series:
    """The timestamp column, plus the offset column when the time is composite (a date + ms into it)."""
    base = _timestamps_ms(frame, mapping)
    if mapping.timestamp_offset is None:
        return base
    unit = "seconds" if mapping.timestamp_offset_unit == "s" else "milliseconds"
    offset = _number(frame, mapping.timestamp_offset, f"a number ({unit} after the '{mapping.timestamp}' time)",
                     "fix or remove that line/row, or set timestamp_offset_unit (s or ms) and import again")
    scale = 1000.0 if mapping.timestamp_offset_unit == "s" else 1.0
    return (base + np.round(offset.to_numpy() * scale).astype("int64")).astype("int64")


def _sessions(user: pd.Series, ts: pd.Series) -> pd.Series:
    """Per-user sessions split at gaps > 30 minutes (the MovieLens rule); rows must be sorted by user, ts."""
    key = user.fillna("")
    new_session = (key != key.shift()) | (ts - ts.shift() > SESSION_GAP_MS)
    session_no = new_session.astype("int64").groupby(key).cumsum() - 1
    return ("s_" + key + "_" + session_no.astype(str)).where(user.notna(), "s__" + session_no.astype(str))


def _event_ids(events: pd.DataFrame, file_key: pd.Series, row: pd.Series) -> list[str]:
    parts = zip(events["user_id"], events["item_id"], events["timestamp"], events["event_type"], file_key, row)
    return [str(uuid.uuid5(_NS, "|".join("" if v is None else str(v) for v in p))) for p in parts]


# --------------------------------------------------------------------------- entry point
def load_interactions(path: Path | str, mapping: ColumnMapping, source: str = "csv") -> Frames:
    """events, items, users from one interaction log (CSV/TSV/Parquet file or a directory of Parquet files).

    Returns frames in EVENT_COLUMNS / ITEM_SCHEMA / USER_SCHEMA order with the same dtypes as the
    MovieLens importers. Catalogs are derived from the log only (first-seen times, "unknown"
    category/segment) because a bare log carries nothing more.
    """
    path = Path(path)
    frame = _read(path, mapping)
    n = len(frame)
    frame[_POS] = np.arange(n)
    rows = pd.DataFrame({
        "user_id": _ids(frame[mapping.user]),
        "item_id": _ids(frame[mapping.item]),
        "timestamp": _event_times_ms(frame, mapping),
        "_file_key": frame["__kairos_key"].to_numpy(),
        "_row": frame[_ROW].to_numpy(),
        "_pos": frame[_POS].to_numpy(),
    })
    if mapping.device is not None:
        dev = _ids(frame[mapping.device]).map(lambda v: None if v is None else v.lower())
        rows["device_type"] = dev.where(dev.notna(), "desktop")
    else:
        rows["device_type"] = "desktop"
    if mapping.event_type is not None:
        et = _ids(frame[mapping.event_type]).map(lambda v: None if v is None else v.lower())
        if mapping.event_type_map:
            et = et.map(lambda v: mapping.event_type_map.get(v, v) if v is not None else None)
        rows["event_type"] = et.astype(object)  # unknown types kept: the contract quarantines them with a reason
    else:
        rows["event_type"] = mapping.default_event_type
    if mapping.value is not None:
        rows["value"] = _number(frame, mapping.value, "a number",
                                "fix or remove that line/row and import again").to_numpy()

    # Sessions and positions are computed in (user, time, file order) order; output is time order.
    rows = rows.sort_values(["user_id", "timestamp", "_pos"], kind="mergesort", na_position="last")
    rows = rows.reset_index(drop=True)
    if mapping.session is not None:
        sess = _ids(frame[mapping.session])
        rows["session_id"] = sess.to_numpy()[rows["_pos"].to_numpy()]
        if mapping.anonymous_users == "session":  # an anonymous session is its own (session-scoped) user
            anon = rows["user_id"].isna() & rows["session_id"].notna()
            rows.loc[anon, "user_id"] = ANON_PREFIX + rows.loc[anon, "session_id"].astype(str)
    else:
        rows["session_id"] = _sessions(rows["user_id"], rows["timestamp"])
    rows["position"] = rows.groupby(rows["session_id"].fillna("\0"), sort=False).cumcount().astype("int64")
    rows["page_context"] = "home_feed"
    rows["schema_version"] = SCHEMA_VERSION
    rows["source"] = source

    if mapping.value is not None:
        long_at, short_at = mapping.value_thresholds
        v = rows["value"].to_numpy()
        imp = rows.assign(event_type="impression", dwell_time_ms=np.int64(0))
        out = rows.assign(event_type=np.where(v >= short_at, "click", "skip"),
                          timestamp=rows["timestamp"] + OUTCOME_DELAY_MS,
                          dwell_time_ms=np.where(v >= long_at, LONG_CLICK_DWELL_MS,
                                                 np.where(v >= short_at, SHORT_CLICK_DWELL_MS, 0)).astype("int64"))
        events = pd.concat([imp, out], ignore_index=True)
    else:
        events = rows.assign(dwell_time_ms=np.int64(0))
        events = with_implied_impressions(events)
    events["event_id"] = _event_ids(events, events["_file_key"], events["_row"])
    events = events.sort_values(["timestamp", "_pos"], kind="mergesort").reset_index(drop=True)
    events = events[EVENT_COLUMNS].astype({"timestamp": "int64", "position": "int64", "dwell_time_ms": "int64",
                                           "schema_version": "int64"})
    return events, _items_from(rows), _users_from(rows)


def with_implied_impressions(events: pd.DataFrame) -> pd.DataFrame:
    """A log that records no impressions gets one, OUTCOME_DELAY_MS before the first engagement of each
    (session, item): labels are per impression, so a click-only or views/purchases log becomes trainable.
    A log that records impressions itself is returned unchanged."""
    types = events["event_type"]
    if (types == "impression").any():
        return events
    engaged = events[types.isin([t for t in EVENT_TYPES if t != "impression"]) & events["item_id"].notna()]
    first = engaged.sort_values(["timestamp", "_pos"], kind="mergesort").drop_duplicates(["session_id", "item_id"])
    implied = first.assign(event_type="impression", timestamp=first["timestamp"] - OUTCOME_DELAY_MS)
    return pd.concat([implied, events], ignore_index=True)


def _items_from(rows: pd.DataFrame) -> pd.DataFrame:
    """Minimal item catalog: every item seen, published when first seen (a log says nothing more)."""
    seen = rows[rows["item_id"].notna()]
    first = seen.groupby("item_id", sort=True)["timestamp"].min()
    return pd.DataFrame({"item_id": first.index.astype(object), "title": "", "category": "unknown",
                         "tags": "unknown", "publish_ts": first.to_numpy().astype("int64")})[ITEM_SCHEMA.names]


def _users_from(rows: pd.DataFrame) -> pd.DataFrame:
    """Minimal user catalog: signed up when first seen, device = the user's most used device in the log."""
    seen = rows[rows["user_id"].notna()]
    first = seen.groupby("user_id", sort=True)["timestamp"].min()
    device = (seen.groupby(["user_id", "device_type"]).size().rename("n").reset_index()
              .sort_values(["user_id", "n", "device_type"], ascending=[True, False, True], kind="mergesort")
              .drop_duplicates("user_id").set_index("user_id")["device_type"])
    return pd.DataFrame({"user_id": first.index.astype(object), "segment": "unknown",
                         "device_type": device.reindex(first.index).fillna("desktop").to_numpy(),
                         "geo_region": "other", "signup_ts": first.to_numpy().astype("int64")})[USER_SCHEMA.names]


__all__ = ["ANON_PREFIX", "ColumnMapping", "ImportError_", "TIMESTAMP_UNITS", "decode_text", "load_interactions",
           "read_delimited", "read_parquet_file", "sniff_delimiter", "with_implied_impressions"]
