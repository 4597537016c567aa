"""Two Rays on one machine (two sweeps at once, or a `ray start` cluster beside a local run): the processes of each
ask their own Ray's state API. Ray Train's placement-group cleaner asks it whether the trial's controller lives; asking
"the" Ray of the machine, it failed with two, or asked the other and removed a running trial's placement group."""

from __future__ import annotations

import pytest

from tests.servers import ray_cluster

pytestmark = pytest.mark.ray


def test_a_local_ray_processes_ask_its_own_state_api_beside_another_ray(tmp_path):
    import ray

    from orchestrator.cluster import connect_ray

    with ray_cluster(tmp_path, workers=0):  # the other Ray: a `ray start` head on this machine
        connect_ray(None)
        try:

            @ray.remote(num_cpus=0)
            class Probe:
                def own_state(self) -> str:
                    from ray.util.state import get_actor

                    return get_actor(ray.get_runtime_context().get_actor_id()).state

            assert ray.get(Probe.remote().own_state.remote(), timeout=300) == "ALIVE"
        finally:
            ray.shutdown()


# What Ray 2.60 raises when a starting node's raylet has not registered with the GCS within its 30 s
RAY_START_TIMEOUT = (
    "The current node timed out during startup. This could happen because some of the raylet failed to startup or "
    "the GCS has become overloaded."
)


def test_a_local_ray_that_misses_its_start_deadline_is_started_again(monkeypatch, capsys):
    """The first start times out as on a busy machine, leaving a process of its own; it is killed, and the second
    start gives a working local Ray."""
    import subprocess

    import ray

    from orchestrator.cluster import connect_ray

    real_init, left_behind = ray.init, []

    def init_timing_out_once(**kwargs):
        if not left_behind:
            left_behind.append(subprocess.Popen(["sleep", "600"]))
            raise Exception(RAY_START_TIMEOUT)
        return real_init(**kwargs)

    monkeypatch.setattr(ray, "init", init_timing_out_once)
    try:
        connect_ray(None, dashboard=False)
        assert ray.cluster_resources()["CPU"] >= 1
    finally:
        ray.shutdown()
    assert left_behind[0].poll() is not None  # the failed attempt's process is gone
    assert "The local Ray did not start (attempt 1 of 3)" in capsys.readouterr().out


def test_a_local_ray_that_never_starts_is_one_clear_error(monkeypatch):
    import ray

    from orchestrator.cluster import connect_ray
    from orchestrator.sweep_error import SweepError

    def init_timing_out(**kwargs):
        raise Exception(RAY_START_TIMEOUT)

    monkeypatch.setattr(ray, "init", init_timing_out)
    expected = r"the local Ray did not start in 3 attempts .* pass its address with --address"
    with pytest.raises(SweepError, match=expected):
        connect_ray(None, dashboard=False)
