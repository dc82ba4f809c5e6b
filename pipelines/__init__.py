"""Dagster wiring of vendor-audit: resources, partitions, sensor, schedule, jobs and the command line."""
