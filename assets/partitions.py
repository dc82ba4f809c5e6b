import dagster as dg

# One partition per complete delivery, keyed ``<vendor>.<batch>``; the sensor adds them.
deliveries = dg.DynamicPartitionsDefinition(name="deliveries")
