"""A trial's training, as a Ray Train worker runs it (`train_loop_per_worker`) and as a trial actor does.

Kept free of heavy imports at module level: Ray's controller actor unpickles `train_loop_per_worker` by reference,
and should not pay for importing MLflow and gptcore. After a failure, the worker group (or the trial actor) starts
again and resumes from the latest checkpoint Ray has.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ray.train
    import torch

    from gptcore.hooks import Hooks
    from orchestrator.trial_spec import TrialSpec


def _quiet_report_logs() -> None:
    """Ray Train logs every report at INFO under a file-path logger name that LoggingConfig misses."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Run the trial's `TrialSpec` (``loop_config["spec"]``) on this Ray Train worker, logged to the trial's MLflow
    run at ``loop_config["tracking_uri"]`` (see `orchestrator.trial.run_trial`)."""
    import ray.train
    import ray.train.torch

    from orchestrator.hooks import TrainReporter
    from orchestrator.preemption import PreemptionNotices
    from orchestrator.trial_spec import TrialSpec

    _quiet_report_logs()
    spec = TrialSpec.from_dict(loop_config["spec"])
    context = ray.train.get_context()
    world_size = context.get_world_size()
    device = ray.train.torch.get_device()  # torch threads on CPU: the job's train.num_threads, set by the loop

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model, move_to_device=device)

    # DDP through Ray's prepare_model; FSDP2 is applied by gptcore itself (prepare_model's "fsdp" is FSDP1, which
    # needs CUDA), on the process group Ray Train set up (one rank included)
    ddp = world_size > 1 and spec.job.train.parallel == "ddp"
    train_trial(
        spec,
        loop_config["tracking_uri"],
        loop_config["ray_trial_id"],
        TrainReporter(),
        ray.train.get_checkpoint(),
        rank=context.get_world_rank(),
        world_size=world_size,
        device=device,
        wrap_model=wrap if ddp else None,
        notices=PreemptionNotices(loop_config["tracking_uri"], spec.run_id) if PreemptionNotices.watched() else None,
    )


def train_trial(
    spec: TrialSpec,
    tracking_uri: str,
    ray_trial_id: str,
    reporter: Hooks,
    checkpoint: ray.train.Checkpoint | None,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    notices: Hooks | None = None,
) -> None:
    """Train ``spec``'s job on this rank from ``checkpoint`` (None: from its start): rank 0 prints its progress and
    logs to the trial's MLflow run; every rank reports to Ray through ``reporter`` (and checkpoints when ``notices``
    says a node is going, on Ray Train workers)."""
    from gptcore.hooks import HookList
    from gptcore.train import train
    from orchestrator.hooks import ConsoleProgress, MlflowLogging
    from orchestrator.prepare import local_dataset

    hooks: list[Hooks] = []
    if rank == 0:
        hooks.append(ConsoleProgress(spec.name))
        hooks.append(MlflowLogging(tracking_uri, spec.run_id, ray_trial_id))
    hooks.append(reporter)  # its final report ends the trial, after MLflow has its data
    if notices is not None:
        hooks.append(notices)  # after the reporter: a notice is recorded once its checkpoint is being written
    data_dir = local_dataset(spec.dataset) if spec.dataset else None
    with ExitStack() as stack:
        resume_from = stack.enter_context(checkpoint.as_directory()) if checkpoint else None
        train(
            spec.job,
            HookList(*hooks),
            resume_from=resume_from,
            rank=rank,
            world_size=world_size,
            device=device,
            wrap_model=wrap_model,
            data_dir=data_dir,
        )
