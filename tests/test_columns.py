"""The column plan on tables that look real: integer, date, ID-like, boolean, constant,
empty and null-laden columns; the coercion at scoring time; what the baseline records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from monitoring.drift import evaluate as drift
from monitoring.profile import baseline as profile
from pipelines.columns import ColumnTypeError, coerce, plan_columns
from pipelines.data import load_training_data
from pipelines.errors import UserError
from pipelines.metrics import resolve_metric
from serving.gateway.csv_bodies import CsvBodyError, csv_as_parquet


def real_table(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """A table with the column kinds public data sets have, and a rare positive class."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "passenger_id": np.arange(1, n + 1),
            "customer_id": rng.permutation(np.arange(10_000, 10_000 + n) * 7),
            "name": [f"Person {i} {rng.integers(1_000_000)}" for i in range(n)],
            "age": np.where(rng.random(n) < 0.2, np.nan, rng.integers(1, 80, n)),
            "pclass": rng.integers(1, 4, n),
            "fare": rng.gamma(2, 10, n).round(2),
            "signup": pd.date_range("2020-01-01", periods=n, freq="D").strftime("%Y-%m-%d"),
            "vip": rng.choice([True, False], n),
            "member": rng.choice(["Yes", "no"], n),
            "constant": 7,
            "empty": np.nan,
            "city": rng.choice(["paris", "lyon", "nice", None], n),
            "label": np.where(rng.random(n) < 0.06, "churn", "stay"),
        }
    )


def _csv(tmp_path: Path, frame: pd.DataFrame, name: str = "table.csv") -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def test_plan_types_and_drops_on_a_csv_as_pandas_reads_it(tmp_path: Path) -> None:
    frame = pd.read_csv(_csv(tmp_path, real_table().drop(columns=["label"])))
    assert frame["pclass"].dtype == np.int64 and frame["age"].dtype == np.float64
    plan = plan_columns(frame)
    assert plan.types == {
        "age": "integer",
        "pclass": "integer",
        "fare": "float",
        "signup": "datetime",
        "vip": "boolean",
        "member": "boolean",
        "city": "string",
    }
    assert plan.dropped == {
        "passenger_id": "id_like",  # a row number
        "customer_id": "id_like",  # unique integers named like an ID
        "name": "id_like",  # text, nearly every value distinct
        "constant": "constant",
        "empty": "empty",
    }
    assert any("'name' dropped (id-like)" in w for w in plan.warnings)
    assert plan.numeric == [
        "age",
        "pclass",
        "fare",
        *(f"signup__{p}" for p in ("year", "month", "day_of_week", "day_of_year")),
    ]


def test_a_unique_integer_measurement_is_kept() -> None:
    # Unique values alone do not make an ID: incomes, weights... are often all distinct.
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"income": rng.choice(100_000, 300, replace=False), "x": range(300)})
    plan = plan_columns(frame)
    assert plan.types["income"] == "integer"
    assert plan.dropped == {"x": "id_like"}


def test_date_column_with_garbage_falls_back_to_categorical() -> None:
    dates = list(pd.date_range("2021-01-01", periods=10).strftime("%Y-%m-%d")) * 7
    frame = pd.DataFrame({"when": dates + ["not a date"] * 10, "x": np.arange(80) % 7})
    plan = plan_columns(frame)
    assert plan.types["when"] == "string"
    assert any("'when' looks like dates" in w for w in plan.warnings)


def test_parquet_timestamps_and_aware_datetimes_are_dates() -> None:
    stamps = pd.date_range("2022-03-01 12:00", periods=50, freq="min", tz="Europe/Paris")
    frame = pd.DataFrame({"at": stamps, "naive": stamps.tz_localize(None), "x": np.arange(50) % 3})
    plan = plan_columns(frame)
    assert plan.types["at"] == plan.types["naive"] == "datetime"
    typed = coerce(frame.head(2), plan)
    assert typed["at__year"].tolist() == [2022.0, 2022.0]
    assert typed["at__month"].tolist() == [3.0, 3.0]


def test_coerce_accepts_what_clients_send() -> None:
    plan = plan_columns(pd.read_csv(_csv_text(real_table().drop(columns=["label"]))))
    rows = pd.DataFrame(
        {
            "age": [3, None, 4.0],  # ints, nulls and whole floats in one column
            "pclass": ["2", 1, np.nan],  # numbers as text parse
            "fare": [1.5, 2, None],
            "signup": ["2024-02-29", None, "garbage"],  # unparseable: missing, as in training
            "vip": [True, "no", None],
            "member": ["YES", 0, None],
            "city": ["paris", 3, None],
            "extra": ["ignored", "ignored", "ignored"],
        }
    )
    typed = coerce(rows, plan)
    assert typed["age"].tolist()[0] == 3.0 and np.isnan(typed["age"].iloc[1])
    assert typed["pclass"].tolist()[:2] == [2.0, 1.0]
    assert typed["signup__day_of_year"].tolist()[0] == 60.0
    assert np.isnan(typed["signup__year"].iloc[2])
    assert typed["vip"].tolist() == ["true", "false", "__missing__"]
    assert typed["member"].tolist() == ["true", "false", "__missing__"]
    assert typed["city"].tolist() == ["paris", "3", "__missing__"]
    assert "extra" not in typed


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("age", "abc", "column age: expected a number, got 'abc'"),
        ("vip", "maybe", "column vip: expected a boolean"),
        ("signup", 20240101, "column signup: expected an ISO-8601 date"),
        ("city", [1, 2], "column city: expected a scalar"),
    ],
)
def test_coerce_names_the_column_of_a_wrong_value(column: str, value: object, expected: str):
    plan = plan_columns(pd.read_csv(_csv_text(real_table().drop(columns=["label"]))))
    row = {"age": 3, "pclass": 1, "fare": 2.0, "signup": "2024-01-01", "vip": True}
    row |= {"member": "no", "city": "nice", column: value}
    with pytest.raises(ColumnTypeError, match=expected):
        coerce(pd.DataFrame([row]), plan)


def test_null_targets_are_counted_and_imbalance_changes_the_default_metric(tmp_path: Path):
    table = real_table()
    table.loc[:9, "label"] = None
    data = load_training_data(str(_csv(tmp_path, table)), "label", "auto")
    assert data.null_target_rows == 10
    assert len(data.features) == len(table) - 10
    assert data.imbalanced and 0 < data.minority_share < 0.1
    assert resolve_metric("", data.task, data.imbalanced) == "average_precision"
    assert resolve_metric("", "classification", False) == "roc_auc"
    assert resolve_metric("f1", data.task, data.imbalanced) == "f1"


def test_a_table_whose_every_feature_is_dropped_is_one_clear_error(tmp_path: Path) -> None:
    table = pd.DataFrame({"row": range(50), "same": 1, "y": ["a", "b"] * 25})
    with pytest.raises(UserError, match=r"no usable feature column.*row \(id_like\)"):
        load_training_data(str(_csv(tmp_path, table)), "y", "auto")


def test_baseline_profiles_dates_as_numbers_and_knows_dropped_columns() -> None:
    table = real_table().drop(columns=["label"])
    plan = plan_columns(table)
    built = profile.build_profile(table, None, plan.types, plan.dropped)
    kinds = {e["name"]: (e["kind"], e["type"]) for e in built["schema"]}
    assert kinds["signup"] == ("numeric", "datetime")
    assert kinds["vip"] == ("categorical", "boolean")
    assert kinds["age"] == ("numeric", "integer")
    assert "name" not in built["features"] and built["ignored"]["name"] == "id_like"
    days = built["features"]["signup"]
    assert days["min"] == pytest.approx((pd.Timestamp("2020-01-01") - pd.Timestamp(0)).days)
    assert set(built["features"]["member"]["top"]) == {"true", "false"}


def test_drift_reads_live_dates_and_booleans_like_the_baseline() -> None:
    table = real_table(2000).drop(columns=["label"])
    plan = plan_columns(table)
    baseline = profile.loads(
        profile.dumps(profile.build_profile(table, None, plan.types, plan.dropped))
    )
    # The same rows as clients send them, dropped columns included: no drift, no schema issue.
    same = drift.evaluate_window(baseline, table.sample(1000, random_state=3))
    assert not same.drifted, same.reasons
    assert not same.schema.extra and not same.schema.invalid_values
    later = table.assign(signup=pd.Timestamp("2030-01-01").strftime("%Y-%m-%d"))
    moved = drift.evaluate_window(baseline, later.sample(1000, random_state=3))
    assert "signup" in moved.drifted_features


def test_csv_bodies_become_parquet_exactly() -> None:
    frame = pd.DataFrame({"a": [1, 2], "b": [0.1 + 0.2, None], "c": ["x", None]})
    back = pd.read_parquet(_bytes_io(csv_as_parquet(frame.to_csv(index=False).encode())))
    assert back["a"].dtype == np.int64 and back["b"].iloc[0] == 0.1 + 0.2
    with pytest.raises(CsvBodyError, match="Failed to parse input as a Pandas DataFrame"):
        csv_as_parquet(b'a,b\n1,"unterminated\n')


def _csv_text(frame: pd.DataFrame):
    import io

    return io.StringIO(frame.to_csv(index=False))


def _bytes_io(data: bytes):
    import io

    return io.BytesIO(data)
