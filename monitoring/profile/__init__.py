"""The baseline profile: its format and builder (runs in training; read by the monitor)."""
