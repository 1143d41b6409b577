"""Raw events coerced to the event schema before the contract judges them: ids to str, numbers to int64,
ISO/datetime timestamps to epoch ms. A value that cannot be coerced is not guessed at: it is flagged
(`<column>__unreadable`) and fails its `<column>_is_integer` rule."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from data_contracts.schema import EVENT_COLUMNS, SCHEMA_VERSION
from data_contracts.event_rules import BLANK_IS_NULL, INT_COLUMNS, OPTIONAL_COLUMNS, REQUIRED_COLUMNS, _UNREADABLE


# --------------------------------------------------------------------------- coercion
def _check_columns(events: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(
            f"events are missing required column(s) {missing}; the event contract needs {list(REQUIRED_COLUMNS)} "
            f"(optional: {list(OPTIONAL_COLUMNS)}). Fix the source to emit them (see data_contracts/schema.py "
            f"EVENT_SCHEMA; schema_version should be {SCHEMA_VERSION})."
        )


def _to_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # ids that went through a float column: 42.0 -> "42"
    return str(value)


def _as_object(raw: pd.Series) -> pd.Series:
    """RangeIndex'd values; string/categorical extension dtypes become plain objects (None for missing)."""
    values = raw.reset_index(drop=True)
    if values.dtype != object and (pd.api.types.is_string_dtype(values.dtype)
                                   or isinstance(values.dtype, pd.CategoricalDtype)):
        values = values.astype(object).where(values.notna(), None)
    return values


def _coerce_strings(raw: pd.Series, blank_is_null: bool) -> pd.Series:
    """Object column of str or None; anything non-null is stringified (ids may arrive as ints)."""
    values = _as_object(raw)
    notna = values.notna()
    if values.dtype == object and pd.api.types.infer_dtype(values, skipna=True) in ("string", "empty"):
        out = values if notna.all() else values.where(notna, None)
    else:
        out = pd.Series(np.full(len(values), None, dtype=object), index=values.index)
        if notna.any():
            out[notna] = values[notna].map(_to_str).astype(object)
    if blank_is_null:
        out = out.where(out != "", None)
    return out


def _datetimes_to_ms(values: pd.Series) -> pd.Series:
    """Datetime-like values to epoch ms (float, NaN where unparseable); naive values are read as UTC."""
    parsed = pd.to_datetime(values, utc=True, errors="coerce", format="ISO8601") if values.dtype == object \
        else (values.dt.tz_localize("UTC") if values.dt.tz is None else values.dt.tz_convert("UTC"))
    ms = (parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "ms")
    return ms.astype("float64")


def _coerce_ints(raw: pd.Series, allow_datetimes: bool) -> tuple[pd.Series, pd.Series]:
    """(Int64 column, unreadable mask): whole numbers pass, anything else becomes null and is flagged."""
    values = _as_object(raw)
    if pd.api.types.is_integer_dtype(values.dtype) and not pd.api.types.is_unsigned_integer_dtype(values.dtype):
        return values.astype("Int64"), pd.Series(False, index=values.index)
    present = values.notna()
    if values.dtype == object:
        present &= values.ne("")  # CSV convention: an empty cell is a missing value
    if pd.api.types.is_bool_dtype(values.dtype):
        nums = pd.Series(np.nan, index=values.index)
    elif pd.api.types.is_datetime64_any_dtype(values.dtype):
        nums = _datetimes_to_ms(values) if allow_datetimes else pd.Series(np.nan, index=values.index)
    else:
        nums = pd.to_numeric(values.where(present), errors="coerce")
        if pd.api.types.is_bool_dtype(nums.dtype) or not pd.api.types.is_numeric_dtype(nums.dtype):
            nums = pd.Series(np.nan, index=values.index)
        if values.dtype == object:
            # to_numeric accepts True/False; a boolean is not a count or a time
            is_bool = values.map(type).isin((bool, np.bool_))
            nums = nums.where(~is_bool)
        if allow_datetimes and values.dtype == object:
            retry = present & nums.isna()
            if retry.any():
                nums = nums.astype("float64")
                nums[retry] = _datetimes_to_ms(values[retry])
    if pd.api.types.is_integer_dtype(nums.dtype) and not pd.api.types.is_unsigned_integer_dtype(nums.dtype):
        out = nums.astype("Int64")
    else:
        f = nums.astype("float64")
        whole = np.isfinite(f) & (np.floor(f) == f) & (f.abs() < 2.0**63)
        out = pd.Series(pd.array(np.where(whole, f, 0).astype("int64"), dtype="Int64"), index=values.index)
        out[~whole] = pd.NA
    unreadable = present & out.isna()
    return out, unreadable


def _typed_frame(events: pd.DataFrame) -> pd.DataFrame:
    """EVENT_COLUMNS in schema types plus `<int col>__unreadable` flag columns, on a RangeIndex."""
    n = len(events)
    cols: dict[str, pd.Series] = {}
    for col in EVENT_COLUMNS:
        raw = events[col] if col in events.columns else pd.Series(np.full(n, None, dtype=object))
        if isinstance(raw, pd.DataFrame):  # duplicated column label: the first one wins
            raw = raw.iloc[:, 0]
        if col in INT_COLUMNS:
            typed, unreadable = _coerce_ints(raw, allow_datetimes=(col == "timestamp"))
            cols[col] = typed
            # 1.0 where the value could not be read as an int64 (the value itself is kept in raw_payload);
            # a float flag rather than the raw object keeps GX's many frame copies cheap
            cols[f"{col}{_UNREADABLE}"] = pd.Series(np.where(unreadable.to_numpy(), 1.0, np.nan), index=typed.index)
        else:
            cols[col] = _coerce_strings(raw, blank_is_null=col in BLANK_IS_NULL)
    return pd.DataFrame(cols, index=pd.RangeIndex(n), copy=False)  # copy=False: no block consolidation
