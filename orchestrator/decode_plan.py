"""A decode sweep on the driver, before Ray starts: each trial's ``decode.checkpoint`` resolved and checked.

``best:<experiment>`` is the best checkpoint of that experiment's latest sweep in the tracking store (read with
`orchestrator.results`); a folder or object-store URI must hold a gptcore checkpoint. Also the dry-run table.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from orchestrator.decoding import BEST_PREFIX

if TYPE_CHECKING:
    from orchestrator.experiment import Trial


def best_checkpoint(experiment: str, tracking_uri: str) -> str:
    """The best checkpoint (lowest best val loss) of ``experiment``'s latest sweep in the tracking store."""
    from gptcore.checkpoint_format import CheckpointError
    from orchestrator.results import ReportError, find_parent_run, trial_results
    from orchestrator.tracking import SWEEP_TAG, client_for

    client = client_for(tracking_uri)
    try:
        parent = find_parent_run(client, experiment)
    except ReportError as exc:
        raise CheckpointError(
            f"decode.checkpoint {BEST_PREFIX}{experiment}: {exc} (tracking store {tracking_uri}; pass "
            "--tracking-uri of the store that has it, or a checkpoint folder)"
        ) from None
    for result in trial_results(client, parent.info.run_id):
        if result.best_checkpoint:
            return result.best_checkpoint
    raise CheckpointError(
        f"decode.checkpoint {BEST_PREFIX}{experiment}: no trial of its latest sweep "
        f"{parent.data.tags.get(SWEEP_TAG, parent.info.run_name)} has a best checkpoint; let the sweep finish "
        "(python -m orchestrator run ... --resume) or pass a checkpoint folder"
    )


def resolve_checkpoint(spec: str, tracking_uri: str) -> str:
    """``decode.checkpoint`` as a checked folder path or object-store URI (``best:<experiment>`` looked up)."""
    import pyarrow.fs as pafs

    from gptcore.checkpoint_format import META_FILE, CheckpointError, read_meta
    from orchestrator.storage import is_uri, local_path

    if spec.startswith(BEST_PREFIX):
        spec = best_checkpoint(spec.removeprefix(BEST_PREFIX), tracking_uri)
    if is_uri(spec):
        fs, path = pafs.FileSystem.from_uri(spec)
        if fs.get_file_info(f"{path.rstrip('/')}/{META_FILE}").type != pafs.FileType.File:
            raise CheckpointError(f"decode.checkpoint {spec} is not a gptcore checkpoint (no {META_FILE} there)")
        return spec
    path = local_path(spec)
    try:
        read_meta(path)
    except CheckpointError as exc:
        raise CheckpointError(f"decode.checkpoint: {exc}") from None
    return str(path)


def resolve_checkpoints(trials: list[Trial], tracking_uri: str) -> list[Trial]:
    """The trials with ``decode.checkpoint`` resolved (each distinct value once)."""
    resolved: dict[str, str] = {}
    out = []
    for trial in trials:
        given = trial.job.checkpoint
        if given not in resolved:
            resolved[given] = resolve_checkpoint(given, tracking_uri)
        job = dataclasses.replace(trial.job, checkpoint=resolved[given])
        out.append(dataclasses.replace(trial, job=job))
    return out


def decode_rows(trials: list[Trial], keys: list[str]) -> tuple[list[str], list[list[str]]]:
    """The dry-run table of a decode sweep."""
    header = ["trial", *keys, "checkpoint", "samples"]
    rows = []
    for trial in trials:
        d = trial.job
        samples = f"{len(d.prompts)} prompt(s) x {d.num_samples}, {d.max_new_tokens} tokens"
        rows.append([trial.name, *[str(trial.params[k]) for k in keys], d.checkpoint, samples])
    return header, rows
