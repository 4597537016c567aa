"""cluster.yaml, checked offline with the Ray autoscaler's own config validation.

`ray up` loads the YAML, then `_bootstrap_config` runs `prepare_config` (merge with the provider's
defaults.yaml, setup-command merging, docker checks, per-type worker limits), asks the cloud for instance
resources, runs `validate_config` (ray-schema.json, no unknown keys, head type, min/max workers) and only then
bootstraps the provider (IAM, key pair, security group). The two offline steps are run here, exactly as `ray up`
calls them; nothing touches AWS or the network. On top: the pins of its setup commands against pyproject.toml,
and no floating `latest` / nightly image or wheel.
"""

from __future__ import annotations

import contextlib
import copy
import re
import shlex
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAMLS = sorted(REPO.glob("cluster*.yaml"))
COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


def load(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)  # what `ray up` does


def ray_up_offline(config: dict[str, Any]) -> dict[str, Any]:
    """The offline part of `ray up`'s `_bootstrap_config`: prepare, then validate; returns the prepared config."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def pyproject_requirements() -> dict[str, Requirement]:
    with open(REPO / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return {Requirement(d).name: Requirement(d) for d in deps}


def all_commands(config: dict[str, Any]) -> Iterator[str]:
    for key in COMMAND_KEYS:
        yield from config.get(key) or []
    for node_type in config["available_node_types"].values():
        for key in ("initialization_commands", "worker_setup_commands"):
            yield from node_type.get(key) or []


def pip_requirements(commands: list[str]) -> list[Requirement]:
    """Requirement specifiers of the `pip install` commands (index URLs, `-e PATH` and flags skipped)."""
    found = []
    for command in commands:
        for part in re.split(r"&&|;", command):
            words = shlex.split(part)
            if "pip" not in words[:3] or "install" not in words:
                continue
            args = words[words.index("install") + 1 :]
            skip_next = False
            for word in args:
                if skip_next:
                    skip_next = False
                elif word in ("-e", "--editable", "--index-url", "-i", "--extra-index-url", "-c", "-r"):
                    skip_next = True
                elif not word.startswith("-"):
                    with contextlib.suppress(InvalidRequirement):
                        found.append(Requirement(word))
    return found


def strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from strings(value)


@pytest.fixture(params=CLUSTER_YAMLS, ids=lambda p: p.name)
def cluster(request) -> dict[str, Any]:
    return load(request.param)


def test_cluster_yaml_exists():
    assert REPO / "cluster.yaml" in CLUSTER_YAMLS


def test_passes_ray_validation(cluster):
    prepared = ray_up_offline(cluster)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # prepare_config merges setup_commands into head/worker setup: ours must not be replaced by the defaults'.
    assert prepared["setup_commands"] == cluster["setup_commands"]


def test_workers_autoscale_from_zero_and_head_is_cpu_only(cluster):
    prepared = ray_up_offline(cluster)
    head = prepared["head_node_type"]
    workers = {name: t for name, t in prepared["available_node_types"].items() if name != head}
    assert workers, "no worker node types"
    assert prepared["available_node_types"][head]["resources"].get("GPU", 0) == 0
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0, name
        assert 0 < node_type["max_workers"] <= prepared["max_workers"], name
        assert node_type["resources"].get("GPU", 0) >= 1, f"{name} is not a GPU node type"


def test_spot_gpu_workers_beside_the_on_demand_ones():
    """ray.worker.g5.spot (the name a prices file looks up): the on-demand g5's machine, bought on the spot market,
    preferred by the autoscaler, and its nodes drain themselves for preemption on EC2's interruption notice."""
    prepared = ray_up_offline(load(REPO / "cluster.yaml"))
    types = prepared["available_node_types"]
    spot, on_demand = types["ray.worker.g5.spot"], types["ray.worker.g5"]
    assert spot["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert "InstanceMarketOptions" not in on_demand["node_config"]
    assert spot["node_config"]["InstanceType"] == on_demand["node_config"]["InstanceType"]
    assert spot["resources"] == on_demand["resources"]
    assert spot["priority"] > on_demand.get("priority", 0)
    drain = [c for c in prepared["worker_start_ray_commands"] if "drain-node" in c]
    assert len(drain) == 1 and "spot/instance-action" in drain[0] and "DRAIN_NODE_REASON_PREEMPTION" in drain[0]


def test_every_node_type_names_its_machine_image(cluster):
    """No node type may fall back to Ray's built-in default AMI (an old Ubuntu 18.04 DLAMI)."""
    if cluster["provider"]["type"] != "aws":
        pytest.skip("AWS only")
    for name, node_type in cluster["available_node_types"].items():
        image = node_type["node_config"].get("ImageId", "")
        assert image.startswith("ami-") and image != "latest_dlami", name


@pytest.mark.parametrize(
    ("where", "good", "typo"),
    [
        ((), "max_workers", "max_worker"),
        ((), "setup_commands", "setup_comands"),
        ((), "head_start_ray_commands", "head_start_ray_command"),
        (("docker",), "run_options", "run_option"),
        (("available_node_types", "ray.worker.g5"), "max_workers", "max_worker"),
        (("available_node_types", "ray.worker.g5"), "resources", "resource"),
    ],
)
def test_misspelt_key_is_rejected(where, good, typo):
    config = load(REPO / "cluster.yaml")
    ray_up_offline(config)  # the untouched config passes
    section = config
    for key in where:
        section = section[key]
    section[typo] = section.pop(good)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_up_offline(config)


def test_pins_match_pyproject(cluster):
    pyproject = pyproject_requirements()
    head_cmds = cluster.get("setup_commands", []) + cluster.get("head_setup_commands", [])
    worker_cmds = cluster.get("setup_commands", []) + cluster.get("worker_setup_commands", [])
    for role, commands in (("head", head_cmds), ("worker", worker_cmds)):
        reqs = {r.name: r for r in pip_requirements(commands)}
        assert {"ray", "torch"} <= reqs.keys(), f"{role} setup does not install ray and torch explicitly"

        ray_req = reqs["ray"]
        assert ray_req.extras == pyproject["ray"].extras, role
        assert ray_req.specifier == pyproject["ray"].specifier, role

        (torch_pin,) = list(reqs["torch"].specifier)
        assert torch_pin.operator == "==", f"{role}: torch must be pinned exactly"
        torch_version = Version(torch_pin.version)
        assert torch_version in pyproject["torch"].specifier, role
        # The release the project is developed and tested with (local build tags like +cpu ignored).
        assert torch_version.release[:2] == Version(metadata.version("torch")).release[:2], role
        makefile = (REPO / "Makefile").read_text() if (REPO / "Makefile").exists() else ""
        make_pin = re.search(r"torch==([\w.+]+)", makefile)
        if make_pin:
            assert torch_version == Version(make_pin.group(1)), f"{role}: Makefile pins torch=={make_pin.group(1)}"

        assert any(re.search(r"pip install .*-e /home/ray/project\b", c) for c in commands), role


def test_docker_images_pinned_to_the_ray_release(cluster):
    (ray_pin,) = list(pyproject_requirements()["ray"].specifier)
    docker = cluster.get("docker") or {}
    images = {docker.get(k) for k in ("image", "head_image", "worker_image")} - {None}
    for node_type in cluster["available_node_types"].values():
        images |= {(node_type.get("docker") or {}).get("worker_image")} - {None}
    assert images, "no docker image"
    for image in images:
        name, _, tag = image.partition(":")
        assert name == "rayproject/ray", image
        assert re.fullmatch(rf"{re.escape(ray_pin.version)}-py3\d+(-(cpu|gpu|cu\d+))?", tag), image


def test_nothing_floating(cluster):
    """No :latest image, nightly build or dev wheel, also after Ray's defaults are merged in."""
    for config in (cluster, ray_up_offline(cluster)):
        for value in strings(config):
            # EC2's instance metadata service has one path for its current API, /latest/: no release of anything
            lowered = value.lower().replace("169.254.169.254/latest/", "169.254.169.254/")
            assert "nightly" not in lowered, value
            assert "latest" not in lowered, value
            assert ".dev0" not in lowered and "ray-wheels" not in lowered, value


def test_token_auth_on_every_node(cluster):
    run_options = " ".join((cluster.get("docker") or {}).get("run_options", []))
    assert "RAY_AUTH_MODE=token" in run_options
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster[key] if "ray start" in c]
        assert starts, key
        assert all("RAY_AUTH_MODE=token ray start" in c for c in starts), key
    head_starts = [c for c in cluster["head_start_ray_commands"] if "ray start --head" in c]
    assert any("--autoscaling-config=~/ray_bootstrap_config.yaml" in c for c in head_starts)
    # Every node and client must share one token: the local one from `ray get-auth-token --generate`.
    mounts = cluster["file_mounts"]
    assert mounts.get("/home/ray/.ray/auth_token") == "~/.ray/auth_token"
    assert mounts.get("/home/ray/project") == "."


def test_mlflow_server_on_head(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    match = re.search(r"mlflow server (.*?)(>|$)", head)
    assert match, "the head does not start an MLflow server"
    args = match.group(1)
    assert "--port 5000" in args
    assert "--backend-store-uri sqlite:////home/ray/mlflow/mlflow.db" in args
    assert "--artifacts-destination" in args
    # The database lives on a host volume, so it survives container restarts.
    assert any("/home/ray/mlflow" in o for o in cluster["docker"].get("head_run_options", []))
    # http://127.0.0.1:5000 must reach it from the GPU workers as well.
    workers = " ".join(cluster["worker_start_ray_commands"])
    assert "TCP-LISTEN:5000,bind=127.0.0.1" in workers and "TCP:$RAY_HEAD_IP:5000" in workers
