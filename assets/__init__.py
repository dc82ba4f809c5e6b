"""Dagster assets and asset checks: thin glue between the files under a home and the ``ml`` library."""
