"""A resumed sweep is the one its sweep.json describes: flags that would change it are refused, before anything starts
(no Ray, nothing written), and its scheduler, concurrency and kind come from sweep.json, not the experiment file."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.cluster import max_concurrent_trials
from orchestrator.experiment import ASHA, Experiment
from orchestrator.plan import SweepOptions, make_plan
from orchestrator.resume import read_sweep, saved_settings, write_sweep
from orchestrator.settings import SweepSettings
from orchestrator.storage import write_json
from orchestrator.sweep_runs import start_sweep_run
from orchestrator.tracking import SweepTracker
from orchestrator.trial_spec import TrialSpec

EXPERIMENT = """
from orchestrator import Experiment, grid
EXPERIMENT = Experiment(
    name="resumed", corpus="the-verdict", model="micro", train={"max_steps": 2, "batch_size": 2},
    grid={"train.lr": grid(1e-3, 2e-3)},
)
"""
SWEEP_ID = "resumed-20250101-000000"
CHANGES = {
    "--set": ["--set", "train.lr=0.5"],
    "--workers": ["--workers", "2"],
    "--use-gpu": ["--use-gpu", "no"],
    "--cpus-per-worker": ["--cpus-per-worker", "1"],
    "--max-concurrent": ["--max-concurrent", "1"],
}


def settings(**fields) -> dict:
    """The settings of a sweep.json as a sweep writes them (``fields`` replace some)."""
    base = SweepSettings(
        sweep_id=SWEEP_ID,
        experiment="resumed",
        experiment_file="exp.py",
        storage="ray_results",
        tracking_uri="sqlite:///mlruns.db",
        artifact_root=None,
        parent_run_id="0",
        workers=1,
        use_gpu=False,
        cpus_per_worker=1,
        max_failures=2,
        checkpoints_to_keep=2,
        metric="val_loss",
        mode="min",
        git_commit=None,
    )
    return {**asdict(base), **fields}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A working directory with an experiment file, a started sweep in ray_results and its parent run in mlruns.db
    (shared: a refused run changes none of it)."""
    work = tmp_path_factory.mktemp("work")
    (work / "exp.py").write_text(EXPERIMENT)
    tracker = SweepTracker(f"sqlite:///{work / 'mlruns.db'}", "resumed")
    parent = tracker.parent_run(SWEEP_ID, params={}, tags={})
    write_json(str(work / "ray_results" / SWEEP_ID / "sweep.json"), {"trials": {}, "settings": settings()})
    return work, tracker, parent


@pytest.fixture
def started(store, monkeypatch):
    monkeypatch.chdir(store[0])
    return store


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_flags_that_would_change_a_resumed_sweep_are_refused(started, capsys):
    work, tracker, parent = started
    before, runs = snapshot(work), tracker.client.search_runs([tracker.experiment_id])
    for flag, args in [*CHANGES.items(), ("--set, --workers", [*CHANGES["--set"], *CHANGES["--workers"]])]:
        for resume in (["--resume"], ["--resume", SWEEP_ID]):
            assert main(["run", "exp.py", *resume, *args]) == 2, args
            err = capsys.readouterr().err
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
            assert err.startswith("error: --resume continues a sweep as it was started"), err
            assert f"cannot take {flag};" in err and "start a new sweep without --resume" in err, err
    assert snapshot(work) == before  # ray_results and mlruns.db untouched
    after = tracker.client.search_runs([tracker.experiment_id])
    assert [(r.info.run_id, r.info.status) for r in after] == [(r.info.run_id, r.info.status) for r in runs]
    assert [r.info.run_id for r in after] == [parent]


def test_resume_with_set_exits_2_from_the_command_line(started):
    work = started[0]
    before = snapshot(work)
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", "exp.py", "--resume", "--set", "train.lr=0.5"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "cannot take --set;" in proc.stderr
    assert proc.stdout == "" and snapshot(work) == before


def test_a_sweep_saves_what_resume_needs(tmp_path):
    """sweep.json holds the kind, the scheduler and the user's concurrency limit (and the resources, as before)."""
    experiment = Experiment(
        name="resumed",
        corpus="the-verdict",
        model="micro",
        grid={"train.lr": [1e-3]},
        scheduler=ASHA(max_t=20, grace_period=5),
        max_concurrent=3,
    )
    options = SweepOptions(workdir=str(tmp_path), workers=2, cpus_per_worker=0.5)
    tracker = SweepTracker(f"sqlite:///{tmp_path / 'mlruns.db'}", "resumed")
    saved = start_sweep_run(tracker, experiment, options, make_plan(experiment, options), SWEEP_ID, "s", False)
    assert (saved.kind, saved.max_concurrent, saved.workers, saved.cpus_per_worker) == ("train", 3, 2, 0.5)
    assert saved.scheduler == {"max_t": 20, "grace_period": 5, "reduction_factor": 3.0, "time_attr": "step"}
    assert saved_settings(asdict(saved), Experiment(name="resumed", grid={"train.lr": [1e-3]})) == saved


def test_resume_reads_the_sweep_from_sweep_json():
    """What the experiment file says does not change a resumed sweep; a sweep.json without these settings takes its."""
    now = Experiment(name="resumed", grid={"train.lr": [1e-3]}, scheduler=ASHA(max_t=90), max_concurrent=8)
    stored = saved_settings(settings(scheduler=None, max_concurrent=1, kind="train"), now)
    assert (stored.scheduler, stored.max_concurrent) == (None, 1)
    assert max_concurrent_trials(stored, address=None) == 1  # the saved limit, no Ray asked
    old = settings()
    for key in ("kind", "scheduler", "max_concurrent"):
        del old[key]
    fallback = saved_settings(old, now)
    assert (fallback.kind, fallback.max_concurrent) == ("train", 8)
    assert fallback.scheduler == asdict(ASHA(max_t=90))


def test_sweep_json_gives_back_each_trial_as_planned(tmp_path):
    """What a resumed trial runs is the job the driver planned, train or decode, read back from sweep.json."""
    train = Experiment(
        name="resumed", corpus="the-verdict", model="micro", train={"max_steps": 2}, grid={"train.lr": [1e-3, 2e-3]}
    )
    decode = Experiment(
        name="resumed",
        kind="decode",
        decode={"checkpoint": "ckpt", "prompts": ["a", "b"]},
        grid={"decode.top_k": [5, None]},
        metric="distinct_2",
        mode="max",
    )
    trials = [t for e in (train, decode) for t in make_plan(e, SweepOptions(cpus_per_worker=2)).trials]
    specs = {t.name: TrialSpec(t.name, t.params, t.job, f"run-{t.index}", "data" if t.preset else None) for t in trials}
    saved = SweepSettings(**settings(storage=str(tmp_path)))
    write_sweep(specs, saved)
    assert read_sweep(str(tmp_path), SWEEP_ID, train) == (specs, saved)
    assert specs["000_lr=0.001"].job.train.num_threads == 2
