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

from gptcore.checkpoint_format import TrainState
from gptcore.hooks import Hooks, TrainContext
from orchestrator.tracking import PREEMPTIONS_TAG, RunLogger, client_for

EVENTS_FILE = "preemptions.json"  # the run's artifact: one entry per notice, the resume's figures added to it
# The last checkpoint is taken this long before the drain's deadline: a checkpoint of a model worth a GPU is written
# in seconds; Ray Train must register it before it tears the group down at the deadline
LAST_CHECKPOINT_S = 15.0
HOLD_GRACE_S = 60.0  # a node still there this long after its deadline was not reclaimed: training goes on
UNKNOWN_DEADLINE_S = 120.0  # Ray Train's DEFAULT_PREEMPTION_DEADLINE_S: its restart when a drain names no deadline


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class PreemptionNotices(Hooks):
    """On every Ray Train worker: asks for a drain notice after each step. On a notice, a checkpoint at once; then
    training goes on until the drain's deadline is ``LAST_CHECKPOINT_S`` away, when a last checkpoint is taken and
    the loop holds until Ray Train restarts the worker group (it does at the deadline): no step trained after the
    last checkpoint is lost. Rank 0 records the event in the trial's MLflow run (``EVENTS_FILE``), and completes it
    when the trial resumes (the steps redone, the time to train again)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.uri, self.run_id = tracking_uri, run_id
        self.seen: set[str] = set()  # the drained nodes already checkpointed for
        self.noticed: tuple[Any, list[str]] | None = None  # a notice to record, once its checkpoint is under way
        self.deadline_s: float | None = None  # the earliest deadline of the drains heard of (epoch seconds)
        self.last = False  # the last checkpoint before the deadline is being taken: hold after it

    @staticmethod
    def watched() -> bool:
        """Whether Ray Train watches this worker group's nodes for drains: not on one machine, unless the sweep is
        spot or elastic (`orchestrator.cluster.worker_env`). Unwatched, no notice comes: nothing to ask for."""
        return os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1") != "0"

    def wants_checkpoint(self, ctx: TrainContext, state: TrainState) -> bool:
        import ray.train
        from ray.train.collective import broadcast_from_rank_zero

        # Every step: a barrier of every rank at Ray Train's synchronization actor, a few ms (bench_preemption.py),
        # where a step of a model worth a GPU takes 100 ms or more; fewer questions would lose steps of the notice
        info = ray.train.get_preemption_info()
        nodes = sorted(set(info.preempted_node_to_ranks) - self.seen) if info is not None else []
        if nodes:
            self.seen.update(nodes)
            self.noticed = (info, nodes)
            # Ray Train restarts the group at the deadline, or DEFAULT_PREEMPTION_DEADLINE_S after the notice
            self.deadline_s = info.deadline_ms / 1000 if info.deadline_ms else time.time() + UNKNOWN_DEADLINE_S
        if self.deadline_s is None:
            return False
        # rank 0's clock decides for every rank: the last checkpoint is a collective of all of them
        self.last = broadcast_from_rank_zero(time.time() >= self.deadline_s - LAST_CHECKPOINT_S)
        return bool(nodes) or self.last

    def on_eval(self, ctx, state, metrics, sample, save) -> None:
        # after the reporter's on_eval: the checkpoint is being written before MLflow is told
        if self.noticed is not None and ctx.is_main:
            try:
                self._record_notice(*self.noticed, state.step)
            except Exception as exc:  # the checkpoint matters, not its record
                print(f"[preemption] could not record the notice in MLflow: {exc}", flush=True)
        self.noticed = None
        if self.last:
            if ctx.is_main:
                try:
                    self._record_last_checkpoint(state.step)
                except Exception as exc:
                    print(f"[preemption] could not record the last checkpoint in MLflow: {exc}", flush=True)
            self._hold(ctx, state.step)

    def _hold(self, ctx: TrainContext, step: int) -> None:
        """Train no further until Ray Train restarts the group at the deadline (it ends this process); a drain
        whose node stays past the deadline and a grace lets training go on."""
        if ctx.is_main:
            print(f"[preemption] last checkpoint at step {step}; waiting for the restart", flush=True)
        while time.time() < self.deadline_s + HOLD_GRACE_S:
            time.sleep(0.2)
        self.deadline_s, self.last = None, False

    def on_train_start(self, ctx: TrainContext, state: TrainState) -> None:
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
                    "notice_step": step,  # the checkpoint taken on the notice
                    "step_saved": step,  # the last checkpoint before the deadline (the same, or later)
                }
            )
        self._write(events)
        print(f"[preemption] node {', '.join(nodes)} is being reclaimed: checkpoint at step {step}", flush=True)

    def _record_last_checkpoint(self, step: int) -> None:
        events = self._events()
        for event in events:
            if "resumed_at" not in event:
                event["step_saved"] = step
        self._write(events)

    def _record_resume(self, step: int, world_size: int) -> None:
        """Complete the events not yet resumed from: this start is their trial training again."""
        events = self._events()
        open_events = [e for e in events if "resumed_at" not in e]
        if not open_events:
            return  # a restart after a failure, not a reclaim (or the sweep resumed)
        history = client_for(self.uri).get_metric_history(self.run_id, "loss")
        last = max(history, key=lambda m: m.step, default=None)  # the last step trained before the node went
        now = time.time()
        resumed = {
            "resumed_at": _now(),
            "resumed_from_step": step,
            "steps_redone": max(last.step - step, 0) if last else 0,
            "seconds_to_resume": round(now - last.timestamp / 1000, 1) if last else None,
            "world_size": world_size,
        }
        for event in open_events:
            noticed = datetime.fromisoformat(event["noticed_at"]).timestamp()
            event.update(resumed, seconds_notice_to_resume=round(now - noticed, 1))
        self._write(events)
        metrics = {"preemption_steps_redone": float(resumed["steps_redone"])}
        if resumed["seconds_to_resume"] is not None:
            metrics["preemption_seconds_to_resume"] = float(resumed["seconds_to_resume"])
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
