"""Drift of a window against a baseline: statistics, the decision and its report."""
