"""The settings of a sweep every trial needs, packed once when the sweep starts (and saved in its sweep.json)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class SweepSettings:
    """What every trial needs to know; JSON-able, saved in sweep.json: on --resume, the sweep as it was started."""

    sweep_id: str
    experiment: str
    experiment_file: str
    storage: str
    tracking_uri: str
    artifact_root: str | None
    parent_run_id: str
    workers: int
    use_gpu: bool
    cpus_per_worker: float
    max_failures: int
    checkpoints_to_keep: int
    metric: str
    mode: str
    git_commit: str | None
    # Saved since resume reads them from sweep.json (older files lack them: `saved_settings` takes the experiment's)
    kind: str = "train"
    scheduler: dict[str, Any] | None = None  # ASHA's fields
    max_concurrent: int | None = None  # the user's limit (--max-concurrent, else the experiment's)
