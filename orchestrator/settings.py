"""The settings of a sweep every trial needs, packed once when the sweep starts (and saved in its sweep.json)."""

from __future__ import annotations

from collections.abc import Iterable
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
    # Trials train in their Tune trial actor, not in a TorchTrainer (`trains_in_trial_actor`); a sweep.json without
    # it was started when every trial ran a TorchTrainer, whose checkpoints its resumed trials must find
    in_trial_actor: bool = False
    # An elastic trial's fewest workers (``workers`` its most; None: always ``workers``, as in a sweep.json without
    # it), and how often Ray Train looks for more of them
    min_workers: int | None = None
    elastic_resize_s: float = 60.0
    spot: bool = False  # the experiment's: trials that may lose nodes to spot reclaims

    @property
    def preemptible(self) -> bool:
        """Trials that must hear of a node's drain (`orchestrator.preemption`): spot, or elastic."""
        return self.spot or self.min_workers is not None

    def workers_said(self) -> str:
        """A trial's workers, for people: "2", or "1-2 elastic"."""
        return f"{self.min_workers}-{self.workers} elastic" if self.min_workers is not None else str(self.workers)

    def num_workers(self) -> int | tuple[int, int]:
        """Ray Train's ``ScalingConfig.num_workers``: a count, or an elastic trial's (min, max)."""
        return (self.min_workers, self.workers) if self.min_workers is not None else self.workers

    def worker_resources(self) -> dict[str, float]:
        """What one worker asks for, its CPUs and a GPU if used: a Ray Train worker, or the trial actor itself when
        it trains (or samples, in a decode sweep) there."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})}


def torch_threads(cpus: float) -> int:
    """Torch's intra-op threads in a process given ``cpus`` CPUs: one per whole CPU, at least one."""
    return max(1, int(cpus))


def trains_in_trial_actor(workers: int, parallel: Iterable[str], *, elastic: bool = False, spot: bool = False) -> bool:
    """Whether a sweep's trials train in their Tune trial actor rather than in a `TorchTrainer` of their own.

    A trial of one worker whose model is not sharded needs nothing of Ray Train: no process group, no worker group.
    In the trial actor it starts no process (Tune reuses the actor of the trial before it, torch already imported)
    where a `TorchTrainer` starts five, about 7 s of a trial's start on two cores. Tune then keeps its checkpoints
    and restarts it from the latest after a failure, as Ray Train does for a worker group. Trials of several workers,
    or sharded (FSDP, which needs Ray Train's process group even on one rank), run a `TorchTrainer` each; so do
    elastic trials (a worker group Ray Train resizes) and those of a ``spot`` experiment, which must hear of a
    node's reclaim (Ray Train's drain notice, `orchestrator.preemption`).
    """
    return workers == 1 and all(p != "fsdp" for p in parallel) and not elastic and not spot
