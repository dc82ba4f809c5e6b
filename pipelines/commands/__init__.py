"""The commands of ``vendor-audit``, one module each with ``register(add)``, in the order the parser shows them."""

COMMAND_MODULES = ("simulate", "demo", "init", "run", "plan", "checks", "labels", "datasets", "checkout", "bench",
                   "automation", "screenshots", "ui")
