"""Regenerate the demo data set shipped with flowline (projects/data/churn.csv).

A synthetic customer-churn table with numeric, integer and categorical columns and a
few missing values, so the demo exercises imputation and one-hot encoding. Run:
``python projects/data/make_demo.py``.
"""

from pathlib import Path

import numpy as np
import pandas as pd

ROWS = 3000
SEED = 7


def make_demo(rows: int = ROWS, seed: int = SEED) -> pd.DataFrame:
    """Build the churn demo table deterministically from ``seed``."""
    rng = np.random.default_rng(seed)
    contract = rng.choice(["month-to-month", "one_year", "two_year"], rows, p=[0.55, 0.25, 0.2])
    internet = rng.choice(["dsl", "fiber", "none"], rows, p=[0.35, 0.45, 0.2])
    payment = rng.choice(
        ["card", "bank_transfer", "electronic_check", "mailed_check"],
        rows,
        p=[0.3, 0.25, 0.3, 0.15],
    )
    tenure = rng.integers(1, 73, rows)
    monthly = np.round(
        20 + 30 * (internet == "fiber") + 15 * (internet == "dsl") + rng.gamma(2.0, 10.0, rows), 2
    )
    total = np.round(monthly * tenure * rng.uniform(0.9, 1.1, rows), 2)
    senior = rng.binomial(1, 0.16, rows)
    calls = rng.poisson(1.5, rows)
    logit = (
        -1.2
        + 1.4 * (contract == "month-to-month")
        - 0.9 * (contract == "two_year")
        + 0.7 * (internet == "fiber")
        + 0.6 * (payment == "electronic_check")
        - 0.04 * tenure
        + 0.02 * (monthly - 60)
        + 0.35 * calls
        + 0.3 * senior
    )
    churned = rng.uniform(size=rows) < 1 / (1 + np.exp(-logit))
    frame = pd.DataFrame(
        {
            "tenure_months": tenure,
            "monthly_charges": monthly,
            "total_charges": total,
            "support_calls": calls,
            "senior": senior,
            "contract": contract,
            "internet_service": internet,
            "payment_method": payment,
            "churned": np.where(churned, "yes", "no"),
        }
    )
    # Real exports have holes: blank totals for brand-new customers and unknown payment methods.
    frame.loc[rng.uniform(size=rows) < 0.02, "total_charges"] = np.nan
    frame.loc[rng.uniform(size=rows) < 0.01, "payment_method"] = None
    return frame


if __name__ == "__main__":
    make_demo().to_csv(Path(__file__).with_name("churn.csv"), index=False)
