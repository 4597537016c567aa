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
    # What resume reads from sweep.json rather than the experiment file; a sweep.json without them takes the
    # experiment file's (`orchestrator.resume.saved_settings`)
    kind: str = "train"
    scheduler: dict[str, Any] | None = None  # ASHA's fields
    max_concurrent: int | None = None  # the user's limit (--max-concurrent, else the experiment's)

    def worker_resources(self) -> dict[str, float]:
        """What one Ray Train worker (a decode trial: the trial itself) asks for: its CPUs, and a GPU if used."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})}


def torch_threads(cpus: float) -> int:
    """Torch's intra-op threads in a process given ``cpus`` CPUs: one per whole CPU, at least one."""
    return max(1, int(cpus))
