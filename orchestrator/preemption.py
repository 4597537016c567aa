"""Spot reclaims of a Ray Train trial: the loop asks Ray for a node's drain notice, checkpoints on it, and the trial's
MLflow run records each event (`PreemptionNotices`).

Ray Train (2.60) watches the nodes of a worker group for drains (a spot reclaim, `ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION`) and tells every worker through `ray.train.get_preemption_info()`, a barrier of all
ranks. On a notice the loop takes a checkpoint at once and trains on; when the node goes, Ray Train restarts the
worker group from that checkpoint (counted against ``FailureConfig.max_preemption_failures``, not ``max_failures``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gptcore.hooks import Hooks, TrainContext
from orchestrator.tracking import PREEMPTIONS_TAG, RunLogger, client_for

EVENTS_FILE = "preemptions.json"  # the run's artifact: one entry per notice, the resume's figures added to it


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class PreemptionNotices(Hooks):
    """On every Ray Train worker: asks for a drain notice after each step and answers `wants_checkpoint` once per
    notice; rank 0 records the event in the trial's MLflow run (``EVENTS_FILE``), and completes it when the trial
    resumes after the reclaim (the steps redone, the time to train again)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.uri, self.run_id = tracking_uri, run_id
        self.seen: set[str] = set()  # the drained nodes already checkpointed for
        self.noticed: tuple[Any, list[str]] | None = None  # a notice to record, once its checkpoint is under way

    @staticmethod
    def watched() -> bool:
        """Whether Ray Train watches this worker group's nodes for drains: not on one machine, unless the sweep is
        spot or elastic (`orchestrator.cluster.worker_env`). Unwatched, no notice comes: nothing to ask for."""
        return os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1") != "0"

    def wants_checkpoint(self, ctx: TrainContext, state) -> bool:
        import ray.train

        # Every step: a barrier of every rank at Ray Train's synchronization actor, a few ms (bench_preemption.py),
        # where a step of a model worth a GPU takes 100 ms or more; fewer questions would lose steps of the notice
        info = ray.train.get_preemption_info()
        nodes = sorted(set(info.preempted_node_to_ranks) - self.seen) if info is not None else []
        if not nodes:
            return False
        self.seen.update(nodes)
        self.noticed = (info, nodes)
        return True

    def on_eval(self, ctx, state, metrics, sample, save) -> None:
        # after the reporter's on_eval: the checkpoint is being written before MLflow is told
        if self.noticed is not None and ctx.is_main:
            try:
                self._record_notice(*self.noticed, state.step)
            except Exception as exc:  # the checkpoint matters, not its record
                print(f"[preemption] could not record the notice in MLflow: {exc}", flush=True)
        self.noticed = None

    def on_train_start(self, ctx: TrainContext, state) -> None:
        if ctx.is_main and ctx.resumed_from:
            try:
                self._record_resume(state.step, ctx.world_size)
            except Exception as exc:
                print(f"[preemption] could not record the resume in MLflow: {exc}", flush=True)

    def _record_notice(self, info: Any, nodes: list[str], step: int) -> None:
        import ray

        addresses = {n["NodeID"]: n.get("NodeManagerAddress") for n in ray.nodes()}
        deadline = datetime.fromtimestamp(info.deadline_ms / 1000, UTC) if info.deadline_ms else None
        events = self._events()
        for node in nodes:
            events.append(
                {
                    "noticed_at": _now(),
                    "node_id": node,
                    "node_ip": addresses.get(node),
                    "ranks": list(info.preempted_node_to_ranks[node]),
                    "deadline": deadline.isoformat(timespec="milliseconds") if deadline else None,
                    "step_saved": step,
                }
            )
        self._write(events)
        print(f"[preemption] node {', '.join(nodes)} is being reclaimed: checkpoint at step {step}", flush=True)

    def _record_resume(self, step: int, world_size: int) -> None:
        """Complete the latest event not yet resumed from: this start is its trial training again."""
        events = self._events()
        if not events or "resumed_at" in events[-1]:
            return  # a restart after a failure, not a reclaim (or the sweep resumed)
        event = events[-1]
        client = client_for(self.uri)
        history = client.get_metric_history(self.run_id, "loss")
        last = max(history, key=lambda m: m.step, default=None)  # the last step trained before the node went
        now = time.time()
        event.update(
            {
                "resumed_at": _now(),
                "resumed_from_step": step,
                "steps_redone": max(last.step - step, 0) if last else 0,
                "seconds_to_resume": round(now - last.timestamp / 1000, 1) if last else None,
                "seconds_notice_to_resume": round(now - datetime.fromisoformat(event["noticed_at"]).timestamp(), 1),
                "world_size": world_size,
            }
        )
        self._write(events)
        metrics = {"preemption_steps_redone": float(event["steps_redone"])}
        if event["seconds_to_resume"] is not None:
            metrics["preemption_seconds_to_resume"] = float(event["seconds_to_resume"])
        logger = RunLogger(self.uri, self.run_id)
        logger.log_metrics(metrics, step=step)
        logger.close()

    def _events(self) -> list[dict[str, Any]]:
        client = client_for(self.uri)
        if not any(a.path == EVENTS_FILE for a in client.list_artifacts(self.run_id)):
            return []
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(client.download_artifacts(self.run_id, EVENTS_FILE, tmp)).read_text())

    def _write(self, events: list[dict[str, Any]]) -> None:
        client = client_for(self.uri)
        client.log_text(self.run_id, json.dumps(events, indent=1), EVENTS_FILE)
        client.set_tag(self.run_id, PREEMPTIONS_TAG, str(len(events)))
