"""The preprocessing that travels inside every logged model.

Scoring requests carry the raw columns of the training file, so type coercion (the
column plan), imputation, scaling and one-hot encoding are part of the model, never a
separate step.
"""

from __future__ import annotations

from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from pipelines.columns import ColumnPlan, InputCoercer

# Caps the one-hot width of high-cardinality columns; rarer values share one column.
MAX_CATEGORIES = 50


def build_preprocessor(plan: ColumnPlan) -> ColumnTransformer:
    """Impute and scale numeric columns; one-hot encode the others (nulls are a category)."""
    return ColumnTransformer(
        [
            (
                "numeric",
                make_pipeline(
                    SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler()
                ),
                plan.numeric,
            ),
            (
                "categorical",
                OneHotEncoder(
                    handle_unknown="infrequent_if_exist",
                    max_categories=MAX_CATEGORIES,
                    sparse_output=False,
                ),
                plan.categorical,
            ),
        ],
        sparse_threshold=0.0,
    )


def with_preprocessing(plan: ColumnPlan, estimator: object) -> Pipeline:
    """Coercion by ``plan``, then the preprocessor, then ``estimator``."""
    return Pipeline(
        [
            ("columns", InputCoercer(plan)),
            ("preprocess", build_preprocessor(plan)),
            ("model", estimator),
        ]
    )
