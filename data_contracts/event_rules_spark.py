"""The event contract's rules (`event_rules`) compiled to Spark column expressions: the row-level quarantine
verdict of the Spark engine (ingestion/refine_spark.py), computed in the JVM without a Python pass over the rows.

Nothing here restates a rule: each `Rule` is read by its GX expectation class and arguments, the way GX reads a
row (nulls pass the set, range and length checks; the not-null rules catch them; `when` is the row condition),
exactly as `event_rules._rule_fails` reads them one event at a time. GX stays the validator of record for the
report (the data docs, data_contracts.events); `tests/test_refine_spark.py` holds the two engines' quarantines
(rows and reasons) equal on a simulated world with every injected fault, and `tests/test_data_contracts.py`
holds these expressions equal to the GX verdict on hand-made bad rows.

Coercion mirrors `event_coercion._typed_frame` for the types a lake table holds: blank ids are null, integer
columns are longs (a whole float is read as its integer, anything else is flagged unreadable and fails its
`<column>_is_integer` rule).
"""
from __future__ import annotations

from typing import Any

from data_contracts.event_rules import _UNREADABLE, BLANK_IS_NULL, INT_COLUMNS, Rule
from data_contracts.schema import EVENT_COLUMNS


def typed_columns(frame: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(typed value per event column, unreadable flag per integer column) as Spark Columns over `frame`'s
    columns (a missing optional column reads as null)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    types = {f.name: f.dataType for f in frame.schema.fields}
    values: dict[str, Any] = {}
    unreadable: dict[str, Any] = {}
    for col in EVENT_COLUMNS:
        kind = types.get(col)
        raw = F.col(col) if kind is not None else F.lit(None)
        if col in INT_COLUMNS:
            if kind is None or isinstance(kind, (T.NullType, T.IntegralType)):
                values[col], unreadable[col] = raw.cast("long"), F.lit(False)
            elif isinstance(kind, T.FractionalType):
                num = raw.cast("double")
                whole = ~F.isnan(num) & (F.floor(num) == num) & (F.abs(num) < F.lit(2.0 ** 63))
                values[col] = F.when(whole, num.cast("long"))
                unreadable[col] = F.coalesce(~whole, F.lit(False))
            else:
                raise NotImplementedError(f"{col} is {kind.simpleString()} in the lake: integer columns are int64 "
                                          f"there (BRONZE_SCHEMA); coerce it before Spark judges it")
        else:
            text = raw.cast("string")
            values[col] = F.when(text != "", text) if col in BLANK_IS_NULL else text
    return values, unreadable


def rule_failure(rule: Rule, values: dict[str, Any], unreadable: dict[str, Any]) -> Any:
    """A boolean Spark Column, true where a row breaks `rule` (never null)."""
    from pyspark.sql import functions as F

    column = rule.kwargs["column"]
    if rule.expectation == "ExpectColumnValuesToBeNull" and column.endswith(_UNREADABLE):
        fails = unreadable[column[: -len(_UNREADABLE)]]
    else:
        value = values[column]
        if rule.expectation == "ExpectColumnValuesToNotBeNull":
            fails = value.isNull()
        elif rule.expectation == "ExpectColumnValuesToBeInSet":
            fails = ~value.isin(list(rule.kwargs["value_set"]))
        elif rule.expectation == "ExpectColumnValuesToBeBetween":
            low, high = rule.kwargs.get("min_value"), rule.kwargs.get("max_value")
            fails = F.lit(False)
            if low is not None:
                fails = fails | (value < F.lit(low))
            if high is not None:
                fails = fails | (value > F.lit(high))
        elif rule.expectation == "ExpectColumnValueLengthsToBeBetween":
            n = F.length(value)
            fails = (n < F.lit(rule.kwargs.get("min_value", 0)))
            if rule.kwargs.get("max_value") is not None:
                fails = fails | (n > F.lit(rule.kwargs["max_value"]))
        else:
            raise NotImplementedError(f"rule {rule.name}: {rule.expectation} has no Spark reading; add it here")
    if rule.when is not None:
        fails = values[rule.when[0]].isin(list(rule.when[1])) & fails
    return F.coalesce(fails, F.lit(False))  # null (a null value under a set/range/length rule) passes


def contract_columns(frame: Any, rules: list[Rule]) -> tuple[dict[str, Any], Any]:
    """(typed event columns, `reasons`): the rule names a row breaks, "; "-joined in rule order (the pandas
    contract's quarantine reasons), null for a valid row."""
    from pyspark.sql import functions as F

    values, unreadable = typed_columns(frame)
    failed = [F.when(rule_failure(rule, values, unreadable), F.lit(rule.name)) for rule in rules]
    reasons = F.concat_ws("; ", *failed)
    return values, F.when(reasons != "", reasons)


__all__ = ["contract_columns", "rule_failure", "typed_columns"]
