"""Experiment files, --set overrides and the dry run: everything checked before Ray starts."""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import build_parser, main
from orchestrator.cluster import trials_that_fit
from orchestrator.experiment import ExperimentError, expand_trials, load_experiment, parse_overrides

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.py"))

GOOD = """
from orchestrator import Experiment, grid
EXPERIMENT = Experiment(name="t", corpus="the-verdict", model="micro", grid={"data.stride": grid(32, 16)})
"""


def write(tmp_path, text, name="exp.py"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_file_passes_dry_run(path, capsys):
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trial(s)" in out and "resources per trial" in out


def test_dry_run_lists_trials_and_resources(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    assert main(["run", str(path), "--dry-run", "--set", "train.lr=1e-3", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "000_stride=32" in out and "001_stride=16" in out
    assert "2 worker(s) x (1 CPU" in out


@pytest.mark.parametrize(
    ("given", "used"),
    [
        (None, "sqlite:///{cwd}/mlruns.db"),
        ("sqlite:///runs/my.db", "sqlite:///{cwd}/runs/my.db"),
        ("mlruns-files", "file://{cwd}/mlruns-files"),
        ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_a_relative_tracking_uri_is_made_absolute_for_the_workers(tmp_path, monkeypatch, capsys, given, used):
    """Ray workers run in other directories: a relative store must name the driver's file."""
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, GOOD)
    assert main(["run", str(path), "--dry-run", *(["--tracking-uri", given] if given else [])]) == 0
    assert f"tracking: {used.format(cwd=tmp_path)}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("EXPERIMENT = (", "syntax error"),
        ("from orchestrator import Experiment\nEXPERIMENT = Experiment(grid={'data.stride': [1]})", "needs a name"),
        ("from orchestrator import Experiment\nEXPERIMENT = Experiment(name='x')", "has no grid"),
        ("from orchestrator import Experiment\nEXPERIMENT = Experiment(name='x', grid={})", "has no grid"),
        (
            "from orchestrator import Experiment\nEXPERIMENT = Experiment(name='x', grid={'data.strid': [1, 2]})",
            "grid key 'data.strid' is not a config field",
        ),
        (
            "from orchestrator import Experiment\nEXPERIMENT = Experiment(name='x', grid={'data.stride': []})",
            "grid axis 'data.stride' is empty",
        ),
        ("x = 1", "does not define EXPERIMENT"),
        ("from orchestrator import Experiment\nEXPERIMENT = Experiment(nme='x')", "unexpected keyword"),
        (
            "from orchestrator import Experiment\n"
            "EXPERIMENT = Experiment(name='x', model='micro', grid={'train.lr': [1e-3, -1.0]})",
            "train.lr",
        ),
    ],
)
def test_malformed_experiment_gets_one_clear_error(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_missing_experiment_file(capsys):
    assert main(["run", "nope/missing.py"]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("train.learning_rate=1", "unknown config key"),
        ("lr=1", "unknown config key"),
        ("train.batch_size=two", "train.batch_size"),
        ("train.batch_size=0", "train.batch_size"),
        ("data.stride=-1", "data.stride"),
        ("train.lr=nan", "train.lr"),
        ("model.pos_emb=alibi", "model.pos_emb"),
        ("train.lr", "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_are_refused(tmp_path, capsys, item, message):
    path = write(tmp_path, GOOD)
    assert main(["run", str(path), "--dry-run", "--set", item]) == 2
    assert message in capsys.readouterr().err


def test_override_values_are_typed():
    assert parse_overrides(["train.lr=1", "model.qkv_bias=false", "train.max_steps=none", "data.corpus=a.txt"]) == {
        "train.lr": 1.0,
        "model.qkv_bias": False,
        "train.max_steps": None,
        "data.corpus": "a.txt",
    }


def test_set_on_a_grid_axis_pins_it(tmp_path):
    experiment = load_experiment(write(tmp_path, GOOD))
    trials = expand_trials(experiment, {"data.stride": 16, "model.n_layers": 2})
    assert [t.name for t in trials] == ["000_stride=16"]
    assert trials[0].job.model.n_layers == 2 and trials[0].job.stride == 16


def test_trial_names_are_deterministic(tmp_path):
    experiment = load_experiment(write(tmp_path, GOOD))
    assert [t.name for t in expand_trials(experiment)] == [t.name for t in expand_trials(experiment)]


def test_cli_exits_nonzero_with_one_line(tmp_path):
    path = write(tmp_path, "EXPERIMENT = (")
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", str(path)], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "syntax error" in proc.stderr
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlruns.db").exists()


def test_every_verb_has_help(capsys):
    """Every verb of the CLI's parser has a help line, is named in the usage, and answers --help."""
    parser = build_parser()
    (verbs,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    helps = {action.dest: action.help for action in verbs._choices_actions}  # a verb added without help= is absent
    assert verbs.choices and all(helps.get(verb) for verb in verbs.choices), helps
    named = re.search(r"\{(.*?)\}", parser.format_usage()).group(1).split(",")
    assert sorted(named) == sorted(verbs.choices)
    for verb in verbs.choices:
        with pytest.raises(SystemExit) as exit_:
            main([verb, "--help"])
        assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage:")


def test_experiment_error_type():
    with pytest.raises(ExperimentError):
        expand_trials(load_experiment(REPO / "experiments" / "stride_sweep.py"), {"data.stride": 0})


@pytest.mark.parametrize(
    ("resources", "workers", "cpus", "gpu", "expected"),
    [
        ({"CPU": 2.0}, 1, 2, False, 1),  # the main job on a 2-core laptop: one trial at a time
        ({"CPU": 2.0}, 1, 1, False, 2),
        ({"CPU": 16.0}, 2, 2, False, 4),
        ({"CPU": 1.0}, 1, 2, False, 1),  # never 0: check_cpus has refused what cannot run at all
        ({"CPU": 32.0, "GPU": 4.0}, 2, 1, True, 2),
    ],
)
def test_a_local_sweep_runs_as_many_trials_at_once_as_fit(resources, workers, cpus, gpu, expected):
    assert trials_that_fit(resources, workers, cpus, gpu) == expected


def test_only_a_local_or_loopback_cluster_counts_as_one_machine():
    """On one machine a trial skips Ray Train's spot-preemption watcher and Prometheus metrics actors."""
    from orchestrator.cluster import on_one_machine, worker_env

    assert on_one_machine(None) and on_one_machine("127.0.0.1:6379") and on_one_machine("ray://localhost:10001")
    assert not on_one_machine("10.0.0.5:6379") and not on_one_machine("auto")
    assert worker_env(local=True)["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in worker_env(local=False)
    # spot or elastic trials hear of drains even there: nodes of one machine can be drained too (tests/test_spot.py)
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in worker_env(local=True, preemptible=True)
