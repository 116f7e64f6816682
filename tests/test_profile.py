"""The baseline profile's statistics against numpy/pandas on known data."""

import json

import numpy as np
import pandas as pd
import pytest

from monitoring.profile import baseline as profile


@pytest.fixture()
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 20_000
    numeric = rng.normal(10.0, 3.0, n)
    numeric[rng.uniform(size=n) < 0.05] = np.nan
    colour = rng.choice(["red", "green", "blue"], n, p=[0.5, 0.3, 0.2]).astype(object)
    colour[rng.uniform(size=n) < 0.1] = None
    many = np.array([f"c{i}" for i in rng.integers(0, 200, n)], dtype=object)
    return pd.DataFrame({"x": numeric, "colour": colour, "many": many})


def test_numeric_statistics_match_numpy(frame: pd.DataFrame) -> None:
    built = profile.loads(profile.dumps(profile.build_profile(frame)))
    stats = built["features"]["x"]
    values = frame["x"].to_numpy()
    present = values[~np.isnan(values)]
    assert stats["kind"] == profile.NUMERIC
    assert stats["count"] == present.size
    assert stats["nulls"] == int(np.isnan(values).sum())
    assert stats["null_rate"] == pytest.approx(np.isnan(values).mean())
    assert stats["mean"] == pytest.approx(present.mean())
    assert stats["std"] == pytest.approx(present.std(ddof=1))
    assert stats["min"] == pytest.approx(present.min())
    assert stats["max"] == pytest.approx(present.max())


def test_quantile_sketch_matches_numpy_within_its_error(frame: pd.DataFrame) -> None:
    built = profile.build_profile(frame)
    view = profile.numeric_baseline(built, "x")
    present = frame["x"].dropna().to_numpy()
    ranks = [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]
    estimated = view.quantiles(ranks)
    # KLL with k=200 guarantees about 1.65% normalised rank error; check in rank space.
    for rank, value in zip(ranks, estimated, strict=True):
        assert abs((present <= value).mean() - rank) < 0.0165
    assert view.sketch.n == present.size


def test_categorical_statistics_match_pandas(frame: pd.DataFrame) -> None:
    built = profile.build_profile(frame)
    colour = built["features"]["colour"]
    expected = frame["colour"].value_counts()
    assert colour["kind"] == profile.CATEGORICAL
    assert colour["top"] == {k: int(v) for k, v in expected.items()}
    assert colour["other"] == 0
    assert colour["nulls"] == int(frame["colour"].isna().sum())
    assert colour["cardinality"] == 3
    many = built["features"]["many"]
    counts = frame["many"].value_counts()
    assert many["cardinality"] == counts.size
    assert len(many["top"]) == profile.TOP_K
    assert sum(many["top"].values()) + many["other"] == len(frame)
    assert many["top"] == {k: int(v) for k, v in counts.iloc[: profile.TOP_K].items()}


def test_schema_rows_and_prediction_distribution(frame: pd.DataFrame) -> None:
    predictions = np.where(frame["x"].fillna(0) > 10, "high", "low")
    built = profile.build_profile(frame, predictions)
    assert built["rows"] == len(frame)
    assert [c["name"] for c in built["schema"]] == ["x", "colour", "many"]
    assert [c["kind"] for c in built["schema"]] == ["numeric", "categorical", "categorical"]
    assert built["prediction"]["top"]["high"] == int((predictions == "high").sum())


def test_profile_is_strict_json_readable_without_flowline(frame: pd.DataFrame) -> None:
    text = profile.dumps(profile.build_profile(frame))
    parsed = json.loads(text)
    assert parsed["format"] == "flowline.baseline" and parsed["version"] == 1


def test_size_grows_sublinearly_with_rows() -> None:
    rng = np.random.default_rng(1)
    sizes = []
    for n in (10_000, 100_000):
        data = pd.DataFrame({f"f{i}": rng.normal(size=n) for i in range(25)})
        sizes.append(len(profile.dumps(profile.build_profile(data))))
    assert sizes[1] < 2 * sizes[0]
    assert sizes[1] < 200 * 1024


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json", "not valid JSON"),
        ('{"format": "other"}', "not a flowline baseline"),
        ('{"format": "flowline.baseline", "version": 99}', "version 99 is not supported"),
    ],
)
def test_loads_rejects_malformed_documents(text: str, message: str) -> None:
    with pytest.raises(profile.ProfileError, match=message):
        profile.loads(text)
