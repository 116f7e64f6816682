"""Shared ground of every flowline package: the registry contract and process, server,
secret and database helpers. It imports nothing of flowline's other packages."""
