"""The monitor service: ingest, store, windows, drift runs, metrics, alerts, HTTP API."""
