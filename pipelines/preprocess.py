"""The preprocessing that travels inside every logged model.

Scoring requests carry the raw columns of the training file, so imputation, scaling
and one-hot encoding are part of the model, never a separate step.
"""

from __future__ import annotations

import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler

MISSING = "__missing__"
# Caps the one-hot width of high-cardinality columns; rarer values share one column.
MAX_CATEGORIES = 50


def as_text(frame: pd.DataFrame) -> pd.DataFrame:
    """Categorical columns as plain strings, with nulls as their own category.

    Scoring may send None, NaN or numbers in a text column; mapping them all the same
    way keeps training and serving consistent.
    """
    return frame.astype(object).where(frame.notna(), MISSING).astype(str)


def build_preprocessor(features: pd.DataFrame) -> ColumnTransformer:
    """Impute and scale numeric columns; impute and one-hot encode the others."""
    numeric = [c for c in features.columns if pd.api.types.is_float_dtype(features[c])]
    categorical = [c for c in features.columns if c not in numeric]
    return ColumnTransformer(
        [
            ("numeric", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric),
            (
                "categorical",
                make_pipeline(
                    FunctionTransformer(as_text, feature_names_out="one-to-one"),
                    OneHotEncoder(
                        handle_unknown="infrequent_if_exist",
                        max_categories=MAX_CATEGORIES,
                        sparse_output=False,
                    ),
                ),
                categorical,
            ),
        ],
        sparse_threshold=0.0,
    )


def with_preprocessing(features: pd.DataFrame, estimator: object) -> Pipeline:
    """A pipeline of the preprocessor followed by ``estimator``."""
    return Pipeline([("preprocess", build_preprocessor(features)), ("model", estimator)])
