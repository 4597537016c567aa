"""Two Rays on one machine (two sweeps at once, or a `ray start` cluster beside a local run): the processes of each
ask their own Ray's state API. Ray Train's placement-group cleaner asks it whether the trial's controller lives; asking
"the" Ray of the machine, it failed with two, or asked the other and removed a running trial's placement group."""

from __future__ import annotations

import pytest

from tests.servers import ray_cluster

pytestmark = pytest.mark.ray


def test_a_local_ray_processes_ask_its_own_state_api_beside_another_ray(tmp_path):
    import ray

    from orchestrator.sweep import connect_ray

    with ray_cluster(tmp_path, workers=0):  # the other Ray: a `ray start` head on this machine
        connect_ray(None)
        try:

            @ray.remote(num_cpus=0)
            class Probe:
                def own_state(self) -> str:
                    from ray.util.state import get_actor

                    return get_actor(ray.get_runtime_context().get_actor_id()).state

            assert ray.get(Probe.remote().own_state.remote(), timeout=120) == "ALIVE"
        finally:
            ray.shutdown()
