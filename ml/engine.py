"""Where the per-image work runs: this process, or a Ray cluster. Torch-free, so that reading a delivery
and the settings need not import it."""

from __future__ import annotations

from dataclasses import dataclass

LOCAL, RAY = "local", "ray"


@dataclass(frozen=True)
class Engine:
    """Where images are decoded and backbone features computed: ``local`` (this process) or ``ray`` (a Ray
    cluster at ``ray_address``: ``auto`` or ``ray://host:port``; empty: a local Ray started for the call, or
    for a whole audit: :func:`ml.ray_features.held_ray`)."""

    name: str = LOCAL
    ray_address: str = ""

    def __post_init__(self):
        if self.name not in (LOCAL, RAY):
            raise ValueError(f"unknown engine {self.name!r}: {LOCAL} or {RAY}")

    @property
    def on_ray(self) -> bool:
        return self.name == RAY
