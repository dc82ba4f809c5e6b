"""vendor-audit's plain library: data, models and estimates. It never imports dagster."""
