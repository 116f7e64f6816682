"""Captured requests: the record contract, the gateway-side client and its spool."""
