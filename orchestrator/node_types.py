"""The node types a sweep's trials can run on — a cluster.yaml's or a running Ray cluster's — and what each holds.

A node type is what one node offers a trial's workers: CPUs, GPUs (their kind, hence their memory from
`gptcore.hardware`) and RAM. A cluster.yaml lists its types under ``available_node_types`` (``resources``; a type's
RAM is known only if its resources name ``memory``, as the autoscaler otherwise asks the cloud). A running cluster's
alive nodes are grouped into types by what they have, its RAM being Ray's ``memory`` resource (what Ray lets tasks and
actors use); on its head, the autoscaler's own copy of the cluster.yaml adds the types that scale from zero.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcore.hardware import gpu_memory_of
from orchestrator.sweep_error import SweepError

ACCELERATOR_PREFIX = "accelerator_type:"
#: Where `ray up` puts the cluster.yaml it launched, on the head node (the autoscaler reads it there).
AUTOSCALER_CONFIG = Path("~/ray_bootstrap_config.yaml")


@dataclass(frozen=True)
class NodeType:
    """One kind of node: what it offers the workers of a trial."""

    name: str
    cpus: float
    gpus: int
    accelerator: str | None  # Ray's accelerator type, e.g. "A10G"
    ram: int | None  # bytes the workers of a CPU trial may use; None: not known here

    @property
    def gpu_memory(self) -> int | None:
        """Bytes of one of its GPUs (`gptcore.hardware.gpu_memory_of`); None when unknown."""
        return gpu_memory_of(self.accelerator) if self.accelerator else None

    def describe(self) -> str:
        """E.g. "ray.worker.g5 (4 CPU, 1x A10G 24 GB)"."""
        parts = [f"{self.cpus:g} CPU"]
        if self.gpus:
            memory = f"{self.gpu_memory / 1e9:.0f} GB" if self.gpu_memory else "memory unknown"
            parts.append(f"{self.gpus}x {self.accelerator or 'GPU'} {memory}")
        parts.append(f"{self.ram / 2**30:.0f} GiB RAM" if self.ram else "RAM unknown")
        return f"{self.name} ({', '.join(parts)})"


def node_type_from_resources(name: str, resources: dict[str, Any]) -> NodeType:
    """A node type of Ray resources (a cluster.yaml type's ``resources``, or an alive node's)."""
    accelerators = [key[len(ACCELERATOR_PREFIX) :] for key in resources if key.startswith(ACCELERATOR_PREFIX)]
    ram = resources.get("memory")
    return NodeType(
        name=name,
        cpus=float(resources.get("CPU", 0)),
        gpus=int(resources.get("GPU", 0)),
        accelerator=accelerators[0] if accelerators else None,
        ram=int(ram) if ram else None,
    )


def cluster_yaml_node_types(path: Path) -> list[NodeType]:
    """The ``available_node_types`` of the cluster launcher config at ``path``."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
        types = config["available_node_types"]
        return [node_type_from_resources(name, spec.get("resources") or {}) for name, spec in types.items()]
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise SweepError(
            f"{path}: not a Ray cluster config with available_node_types ({type(exc).__name__}: {exc}); fix it "
            "(`ray up` validates it) or move it out of the working directory"
        ) from None


def live_node_types() -> list[NodeType]:
    """The connected Ray cluster's alive nodes grouped by what they offer (named by one node's address and how many
    are alike), and, on its head, the node types its autoscaler may still start."""
    import ray

    groups: dict[tuple, list[str]] = {}  # what a node offers -> the addresses of the nodes that offer it
    shapes: dict[tuple, dict[str, Any]] = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node["Resources"]
        shape = node_type_from_resources("", resources)
        key = (shape.cpus, shape.gpus, shape.accelerator, round((shape.ram or 0) / 2**30))
        groups.setdefault(key, []).append(node.get("NodeManagerAddress", "?"))
        shapes.setdefault(key, resources)
    live = []
    for key, addresses in groups.items():
        name = f"node {addresses[0]}" + (f" (+{len(addresses) - 1} alike)" if len(addresses) > 1 else "")
        live.append(node_type_from_resources(name, shapes[key]))
    config = AUTOSCALER_CONFIG.expanduser()
    return live + (cluster_yaml_node_types(config) if config.is_file() else [])


def node_types_of(address: str | None, workdir: str) -> tuple[list[NodeType], str]:
    """The node types a sweep's trials would run on, and whose they are: the running cluster's at ``address`` (or
    ``RAY_ADDRESS``), else those of cluster.yaml in ``workdir`` (none without one)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        import ray

        from orchestrator.cluster import connect_ray

        connect_ray(address, dashboard=False)
        try:
            return live_node_types(), f"the Ray cluster at {address}"
        finally:
            ray.shutdown()
    path = Path(workdir, "cluster.yaml")
    return (cluster_yaml_node_types(path), "cluster.yaml") if path.is_file() else ([], "")


def uses_gpu(use_gpu: bool | str, node_types: list[NodeType]) -> bool:
    """Whether a trial runs on GPUs among ``node_types``: "auto" does when any type has one (as `resolve_gpu`)."""
    return use_gpu is True or (use_gpu == "auto" and any(t.gpus for t in node_types))


def workers_per_node(node: NodeType, cpus_per_worker: float, gpu: bool) -> int:
    """How many of a trial's workers one node of ``node`` holds: a GPU each (on GPUs) and their CPUs."""
    by_cpu = int(node.cpus // cpus_per_worker)
    return min(by_cpu, node.gpus) if gpu else by_cpu


def nodes_needed(node: NodeType, workers: int, cpus_per_worker: float, gpu: bool) -> int | None:
    """The nodes of ``node`` a trial of ``workers`` workers takes; None when one node holds none of them."""
    per_node = workers_per_node(node, cpus_per_worker, gpu)
    return math.ceil(workers / per_node) if per_node else None


def fits(node: NodeType, worker_bytes: int, workers: int, cpus_per_worker: float, gpu: bool) -> bool | None:
    """Whether a trial's workers, each holding ``worker_bytes`` at its peak, fit nodes of ``node``: on GPUs each in
    one GPU's memory, on CPUs a node's workers together in its RAM. None when the memory is not known here."""
    per_node = workers_per_node(node, cpus_per_worker, gpu)
    if per_node == 0:
        return False
    have = node.gpu_memory if gpu else node.ram
    if have is None:
        return None
    return worker_bytes * (1 if gpu else min(per_node, workers)) <= have
