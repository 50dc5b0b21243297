"""Ingest shell: read delivery files into canonical DataFrames plus quarantined rows."""
