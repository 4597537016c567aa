"""Hooks a trial plugs into gptcore's `train`: reports to Ray, console progress, MLflow.

Rank 0 logs per-step metrics, samples and the loss curve to the trial's MLflow child run. Results and checkpoints go
to Tune at evaluation points: from Ray Train workers (`TrainReporter`; every rank takes part, a collective), or
from the trial actor itself when a trial trains there (`TuneReporter`).
"""

from __future__ import annotations

import logging
import math
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train
import torch
from ray.train import CheckpointUploadMode

from gptcore.accounting import training_flops_per_token
from gptcore.checkpoint_format import TrainState
from gptcore.checkpointing import CheckpointSaver
from gptcore.hardware import model_flops_utilisation, peak_flops
from gptcore.hooks import Hooks, TrainContext, TrainResult
from orchestrator.system_metrics import TrialSystemMetrics, start_system_metrics
from orchestrator.tracking import STATUS_TAG, STORE_PATIENCE_S, RunLogger

UploadFn = Callable[[ray.train.Checkpoint, str], ray.train.Checkpoint]
STEP_METRICS = ("loss", "lr", "grad_norm", "tokens_seen", "tokens_per_sec", "epoch")


class StepClock:
    """Seconds per step since training (re)started, and the time left at that pace."""

    def __init__(self) -> None:
        self.started, self.start_step = time.perf_counter(), 0

    def start(self, step: int) -> None:
        self.started, self.start_step = time.perf_counter(), step

    def eta_s(self, step: int, total_steps: int) -> float:
        per_step = (time.perf_counter() - self.started) / max(step - self.start_step, 1)
        return per_step * max(total_steps - step, 0)


class RayReporter(Hooks):
    """Reports evaluation metrics, and checkpoints at checkpoint points, to Tune: the same results on either path a
    trial trains on (`TrainReporter`: Ray Train workers; `TuneReporter`: the trial actor itself)."""

    def __init__(self) -> None:
        self.clock = StepClock()
        self.last: dict[str, Any] = {}

    def on_train_start(self, ctx: TrainContext, state: TrainState) -> None:
        self.clock.start(state.step)

    def _progress(self, ctx: TrainContext, state: TrainState) -> dict[str, float]:
        return {
            "step": state.step,
            "epoch": round(ctx.epochs_done(state), 3),
            "tokens_seen": state.tokens_seen,
            "eta_s": round(self.clock.eta_s(state.step, ctx.total_steps), 1),
        }

    def on_eval(self, ctx, state, metrics, sample, save) -> None:
        self.last = {**metrics, **self._progress(ctx, state)}
        self.report(ctx, dict(self.last), save, f"checkpoint_{state.step:07d}")

    def on_train_end(self, ctx, state, result: TrainResult) -> None:
        final = {
            **self.last,
            **{k: v for k, v in result.metrics.items() if isinstance(v, float)},
            **self._progress(ctx, state),
            "status": result.status,
            "wall_time_s": round(result.wall_time, 2),
            "avg_tokens_per_sec": round(result.tokens_per_sec, 1),
            "final": True,
        }
        # A diverged trial's NaN losses become +inf: Tune needs the metric in every result, and inf ranks last.
        self.report(ctx, {k: math.inf if isinstance(v, float) and math.isnan(v) else v for k, v in final.items()})

    def report(
        self, ctx: TrainContext, metrics: dict[str, Any], save: CheckpointSaver | None = None, name: str = ""
    ) -> None:
        """Report ``metrics``, with the checkpoint ``save`` takes (named ``name``) when it is given."""
        raise NotImplementedError


class TrainReporter(RayReporter):
    """On Ray Train workers: every rank reports the same metrics the same number of times; rank 0 attaches the
    checkpoint (every rank, when sharded), and Ray registers it once every rank that attached it has reported it.

    Reports go through Ray's upload thread in order, so a checkpoint being written never blocks training.
    """

    def report(self, ctx, metrics, save=None, name=""):
        checkpoint, upload, delete_local = None, None, False
        if save is not None and (ctx.is_main or save.sharded):  # sharded: a collective, each rank its own shards
            checkpoint, upload, delete_local = self._start_checkpoint(save, name)
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=name if save is not None else None,
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=delete_local,
            checkpoint_upload_fn=upload,
        )

    @staticmethod
    def _start_checkpoint(save: CheckpointSaver, name: str) -> tuple[ray.train.Checkpoint, UploadFn, bool]:
        """Start writing a checkpoint in the background; Ray's upload thread waits for it, then registers it."""
        storage = ray.train.get_context().get_storage()
        if isinstance(storage.storage_filesystem, pafs.LocalFileSystem):
            # Local or NFS storage: written in place (atomically), nothing is copied. Sharded: every rank writes
            # into this one folder (renamed into place once all shards are written).
            path = storage.build_checkpoint_path_from_name(name)
            written = save.start(Path(path))

            def in_place(checkpoint: ray.train.Checkpoint, _name: str) -> ray.train.Checkpoint:
                written.result()
                return checkpoint

            return ray.train.Checkpoint(path, filesystem=storage.storage_filesystem), in_place, False
        # Object storage: written to a local folder, then uploaded (and the local copy deleted). Sharded: each rank
        # its own folder of its shards (rank 0's with meta.json), all uploaded into the checkpoint's one folder.
        local = Path(tempfile.mkdtemp(prefix="gptcore-ckpt-"))
        written = save.start(local)

        def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
            written.result()
            return storage.persist_current_checkpoint(checkpoint, dir_name)

        return ray.train.Checkpoint.from_directory(str(local)), upload, True


class TuneReporter(RayReporter):
    """In a trial actor (one worker, no Ray Train): reports go to Tune in order, from a thread of their own, so that
    training goes on while a checkpoint is written to a local folder and Tune copies it into the trial's storage.

    Tune keeps a trial's reports waiting until it has taken each one, and ends a trial it stops (a scheduler's
    decision) inside a report: that end is raised in the training thread at its next report. The last report
    returns once every report is with Tune.
    """

    def __init__(self) -> None:
        super().__init__()
        # Tune logs every checkpoint's copy at INFO: one line per evaluation on the driver's console
        logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
        self.reports = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tune-report")
        self.sent: list[Future[None]] = []

    def report(self, ctx, metrics, save=None, name=""):
        self._raise_failed()
        folder = written = None
        if save is not None:
            folder = Path(tempfile.mkdtemp(prefix="gptcore-ckpt-"))
            written = save.start(folder)
        self.sent.append(self.reports.submit(_report_to_tune, metrics, written, folder))

    def on_train_end(self, ctx, state, result: TrainResult) -> None:
        super().on_train_end(ctx, state, result)
        self.reports.shutdown(wait=True)
        self._raise_failed()

    def _raise_failed(self) -> None:
        for sent in [s for s in self.sent if s.done()]:
            self.sent.remove(sent)
            sent.result()  # a failed report (or the trial's end, as Tune asks for it) ends training here


def _report_to_tune(metrics: dict[str, Any], written: Future[Path] | None, folder: Path | None) -> None:
    import ray.tune

    try:
        if written is None:
            ray.tune.report(metrics)
        else:
            written.result()
            ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(str(folder)))
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


class ConsoleProgress(Hooks):
    """One line per evaluation on the driver's console: step, epoch, losses, speed and ETA."""

    def __init__(self, trial: str):
        self.trial = trial
        self.clock = StepClock()

    def on_train_start(self, ctx, state) -> None:
        self.clock.start(state.step)
        resumed = f", resumed from step {state.step}" if ctx.resumed_from else ""
        print(
            f"[{self.trial}] {ctx.total_steps} steps ({ctx.steps_per_epoch}/epoch), {ctx.train_windows} train / "
            f"{ctx.val_windows} val windows, {ctx.world_size} worker(s) on {ctx.device}{resumed}",
            flush=True,
        )

    def on_eval(self, ctx, state, metrics, sample, save) -> None:
        eta = self.clock.eta_s(state.step, ctx.total_steps)
        print(
            f"[{self.trial}] step {state.step}/{ctx.total_steps} epoch {ctx.epochs_done(state):.2f} "
            f"train {metrics['train_loss']:.3f} val {metrics['val_loss']:.3f} "
            f"{metrics.get('tokens_per_sec', 0):.0f} tok/s ETA {eta:.0f}s" + (" [checkpoint]" if save else ""),
            flush=True,
        )

    def on_train_end(self, ctx, state, result) -> None:
        print(f"[{self.trial}] {result.status} after {state.step} steps in {result.wall_time:.0f}s", flush=True)


class MlflowLogging(Hooks):
    """Rank 0: per-step and evaluation metrics, samples, loss curve and outcome to the child run."""

    def __init__(self, tracking_uri: str, run_id: str, ray_trial_id: str | None = None):
        self.uri, self.run_id, self.ray_trial_id = tracking_uri, run_id, ray_trial_id
        self.logger: RunLogger | None = None
        self.flops_per_token: float | None = None
        self.peak: float | None = None
        self.system_metrics: TrialSystemMetrics | None = None  # CPU, memory (GPU) of this worker's node

    def on_train_start(self, ctx: TrainContext, state: TrainState) -> None:
        # Steps the run already has are not logged again: after a resume from a checkpoint, and after a trial
        # restarted from scratch (its driver killed before a checkpoint), whose seeded steps repeat the same values.
        skip = RunLogger.last_logged_step(self.uri, self.run_id)
        self.logger = RunLogger(self.uri, self.run_id, skip_steps_upto=skip)
        self.system_metrics = start_system_metrics(self.run_id, self.uri)
        model = ctx.model
        self.flops_per_token = training_flops_per_token(ctx.config.model)
        self.peak = peak_flops(ctx.device)
        tags = {
            "host": socket.gethostname(),
            "device": str(ctx.device) if ctx.device.type != "cuda" else torch.cuda.get_device_name(ctx.device),
            "precision": str(ctx.dtype).replace("torch.", "") if ctx.dtype else "fp32",
            "world_size": str(ctx.world_size),
            "init_from": str(ctx.init_report.get("init_from", "scratch")),
            STATUS_TAG: "running",
        }
        tags.update({f"init.{k}": str(v) for k, v in ctx.init_report.items() if k != "init_from"})
        if ctx.resumed_from:
            tags["resumed_from_step"] = str(state.step)
        if self.ray_trial_id:
            tags["ray_trial_id"] = self.ray_trial_id
        self.logger.set_tags(tags)
        self.logger.log_metrics(
            {
                "params_total": float(model.num_params()),
                "params_trainable": float(model.num_params(trainable_only=True)),
                "train_windows": float(ctx.train_windows),
                "val_windows": float(ctx.val_windows),
            },
            step=0,
        )

    def on_step(self, ctx, state, metrics) -> None:
        values = {k: metrics[k] for k in STEP_METRICS if k in metrics}
        mfu = model_flops_utilisation(metrics["tokens_per_sec"] / ctx.world_size, self.flops_per_token, self.peak)
        if mfu is not None:
            values["mfu"] = mfu
        self.logger.log_metrics(values, step=state.step)

    def on_eval(self, ctx, state, metrics, sample, save) -> None:
        keys = ("train_loss", "val_loss", "val_perplexity", "best_val_loss")
        self.logger.log_metrics({k: metrics[k] for k in keys if k in metrics}, step=state.step)
        if sample is not None:
            self.logger.log_text(sample + "\n", f"samples/step_{state.step:06d}.txt")
        # Deliver every step up to this evaluation before RayReporter reports it. A scheduler may stop the trial on
        # this report, killing the worker with whatever is still queued; and a worker lost after a checkpoint resumes
        # from it, skipping the steps it retrains as already logged. So none may be left unsent, unless the store is
        # down: then training goes on (what is queued is delivered when it is back).
        self.logger.flush(timeout=10, unless_outage=True)

    def on_train_end(self, ctx, state, result: TrainResult) -> None:
        self.logger.log_metrics(
            {"wall_time_s": result.wall_time, "avg_tokens_per_sec": result.tokens_per_sec}, step=state.step
        )
        self.logger.set_tags({STATUS_TAG: result.status})
        self.logger.flush(timeout=STORE_PATIENCE_S)  # a trial's results wait out a server restart, not lost at once
        try:
            from orchestrator.report import log_trial_curve

            log_trial_curve(self.uri, self.run_id)
        except Exception as exc:  # a missing plot must not fail a finished trial
            print(f"[mlflow] could not plot the loss curve: {exc}", flush=True)
        if self.system_metrics is not None:
            self.system_metrics.finish()
        self.logger.close()
