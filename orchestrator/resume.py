"""A sweep's sweep.json: written when the sweep starts, found and read back by ``--resume``, which refuses changes.

A resumed sweep is the one its sweep.json describes: its trials (each a `TrialSpec`) and its settings, whatever the
experiment file or the command line say now.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import pyarrow.fs as pafs

from orchestrator.experiment import Experiment
from orchestrator.settings import SweepSettings
from orchestrator.storage import filesystem, read_json, write_json
from orchestrator.storage import join as join_path
from orchestrator.sweep_error import SweepError
from orchestrator.trial_spec import TrialSpec

SWEEP_FILE = "sweep.json"
# What a resumed sweep takes from its sweep.json, as the option (a `SweepOptions` field, and the name `run` parses its
# flag to) and the flag that would change it: given with --resume, each is refused, not ignored.
FIXED_ON_RESUME = {
    "overrides": "--set",
    "workers": "--workers",
    "use_gpu": "--use-gpu",
    "cpus_per_worker": "--cpus-per-worker",
    "max_concurrent": "--max-concurrent",
}


def sweep_file(storage: str, sweep_id: str) -> str:
    """Where the sweep ``sweep_id`` keeps its sweep.json."""
    return join_path(storage, sweep_id, SWEEP_FILE)


def write_sweep(specs: dict[str, TrialSpec], settings: SweepSettings) -> None:
    """Save a new sweep's trials and settings, all that ``--resume`` needs of it."""
    trials = {name: spec.to_dict() for name, spec in specs.items()}
    write_json(sweep_file(settings.storage, settings.sweep_id), {"trials": trials, "settings": asdict(settings)})


def read_sweep(storage: str, sweep_id: str, experiment: Experiment) -> tuple[dict[str, TrialSpec], SweepSettings]:
    """The trials and settings a sweep saved (`find_sweep` has found its sweep.json)."""
    saved = read_json(sweep_file(storage, sweep_id))
    specs = {name: TrialSpec.from_dict(raw) for name, raw in saved["trials"].items()}
    return specs, saved_settings(saved["settings"], experiment)


def saved_settings(saved: dict[str, Any], experiment: Experiment) -> SweepSettings:
    """The settings in a sweep.json; a field a sweep.json lacks comes from the experiment file."""
    defaults = {
        "kind": experiment.kind,
        "scheduler": experiment.scheduler_settings(),
        "max_concurrent": experiment.max_concurrent,
    }
    return SweepSettings(**{**defaults, **saved})


def refuse_changes_on_resume(given: Mapping[str, Any]) -> None:
    """Refuse the options in ``given`` (by `SweepOptions` field, or the parsed command line) that would change the
    sweep being resumed: a value other than None or empty is a change."""
    flags = [flag for name, flag in FIXED_ON_RESUME.items() if given.get(name) not in (None, {}, [])]
    if flags:
        raise SweepError(
            f"--resume continues a sweep as it was started (its trials, scheduler, concurrency and resources are in "
            f"its sweep.json) and cannot take {', '.join(flags)}; start a new sweep without --resume to change them"
        )


def find_sweep(storage: str, experiment: str, which: str) -> str:
    """The sweep id to resume: ``which`` itself, or the newest sweep of ``experiment``."""
    fs, root = filesystem(storage)
    if which != "latest":
        if read_json(sweep_file(storage, which)) is None:
            raise SweepError(f"no sweep {which!r} in {storage}; run without --resume to start one")
        return which
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        infos = []
    names = sorted(
        i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(f"{experiment}-")
    )
    for name in reversed(names):
        if read_json(sweep_file(storage, name)) is not None:
            return name
    raise SweepError(f"nothing to resume: no sweep of {experiment!r} in {storage}; run without --resume")
