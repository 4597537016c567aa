"""The prices file: what a node of each node type costs per hour, on-demand and spot, read and checked.

``prices.yaml`` in the working directory (the repo root, beside cluster.yaml), or the file ``run --prices`` names.
A mapping of node type names (cluster.yaml's ``available_node_types``) to prices in USD per node-hour; either price
may be left out (a spot-only type has no on-demand price)::

    ray.worker.g5: {on_demand: 1.006, spot: 0.45}

Prices live here, not in cluster.yaml: Ray's validator refuses keys it does not know there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from orchestrator.sweep_error import SweepError

DEFAULT_PRICES = "prices.yaml"
PRICE_KEYS = ("on_demand", "spot")


@dataclass(frozen=True)
class NodePrice:
    """USD per node-hour of one node type; None where the file gives none."""

    on_demand: float | None
    spot: float | None


def prices_path(given: str | None, workdir: str) -> Path | None:
    """The prices file a dry run reads: ``given`` (which must exist), else ``prices.yaml`` in ``workdir`` if there is
    one; None without either."""
    if given:
        path = Path(workdir, given)
        if not path.is_file():
            raise SweepError(f"--prices {given}: no such file; give a YAML file of node type prices (see prices.yaml)")
        return path
    default = Path(workdir, DEFAULT_PRICES)
    return default if default.is_file() else None


def read_prices(path: Path, node_types: list[str]) -> dict[str, NodePrice]:
    """The prices at ``path``, each keyed by one of ``node_types`` (the cluster's); anything else is refused."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        problem = " ".join(str(exc).split())
        raise SweepError(f"{path}: not a readable YAML file ({problem}); fix it or remove it") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping of node type to prices, e.g. ray.worker.g5: {{on_demand: 1.0}}")
    return {name: node_price(path, name, entry, node_types) for name, entry in raw.items()}


def node_price(path: Path, name: object, entry: object, node_types: list[str]) -> NodePrice:
    """One node type's entry of the prices file, checked: a known type, known keys, non-negative numbers."""
    if name not in node_types:
        raise SweepError(
            f"{path}: unknown node type {name!r}; price the node types of the cluster: {', '.join(node_types)}"
        )
    if not isinstance(entry, dict) or not entry or set(entry) - set(PRICE_KEYS):
        raise SweepError(
            f"{path}: {name}: expected {{on_demand: USD, spot: USD}} per node-hour (either may be left out), "
            f"got {entry!r}"
        )
    for key, value in entry.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise SweepError(f"{path}: {name}.{key} = {value!r} is not a price; give USD per node-hour, >= 0")
    return NodePrice(on_demand=entry.get("on_demand"), spot=entry.get("spot"))
