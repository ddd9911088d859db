"""Launchers: where workers run (local processes now; cluster launchers share the same run directory)."""
