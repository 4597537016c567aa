"""Decode experiments before Ray starts: validation, checkpoint resolution, sampling and measuring."""

from __future__ import annotations

import pytest

from gptcore.checkpoint_format import TrainState
from gptcore.checkpoint_whole import save_checkpoint
from gptcore.model import GPT
from orchestrator.cli import main
from orchestrator.decode_plan import resolve_checkpoint
from orchestrator.decode_trial import sample_and_measure
from orchestrator.decoding import DecodeConfig
from orchestrator.experiment import expand_trials, load_experiment
from tests.conftest import tiny_job

DECODE = """
from orchestrator import Experiment, grid
EXPERIMENT = Experiment(
    name="dec", kind="decode", decode={{"checkpoint": {checkpoint!r}, "num_samples": 3, "max_new_tokens": 6}},
    grid={{"decode.temperature": grid(0.5, 1.0), "decode.top_k": grid(5, None)}}, metric="distinct_2", mode="max",
)
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    job = tiny_job()
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "checkpoint", model=GPT(job.model), config=job, state=TrainState(step=3)
    )


def write(tmp_path, checkpoint="best:nothing_yet", text=DECODE):
    path = tmp_path / "dec.py"
    path.write_text(text.format(checkpoint=str(checkpoint)))
    return path


def test_decode_grid_expands_and_dry_runs(tmp_path, capsys):
    trials = expand_trials(load_experiment(write(tmp_path)))
    assert [t.name for t in trials] == [
        "000_temperature=0.5_top_k=5",
        "001_temperature=0.5_top_k=None",
        "002_temperature=1_top_k=5",
        "003_temperature=1_top_k=None",
    ]
    assert trials[1].job == DecodeConfig(
        checkpoint="best:nothing_yet", num_samples=3, max_new_tokens=6, temperature=0.5
    )
    assert main(["run", str(write(tmp_path)), "--dry-run", "--set", "decode.top_p=0.9"]) == 0
    out = capsys.readouterr().out
    assert "4 trial(s), metric distinct_2 (max)" in out and "best:nothing_yet" in out and "1 prompt(s) x 3" in out


def test_set_with_a_list_narrows_a_grid_axis(tmp_path):
    trials = expand_trials(load_experiment(write(tmp_path)), {"decode.temperature": [0.7, 1.3], "decode.top_k": 3})
    assert [t.name for t in trials] == ["000_temperature=0.7_top_k=3", "001_temperature=1.3_top_k=3"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('decode={"checkpoint": "x", "temprature": 1}', "unknown key(s) temprature"),
        ('decode={"checkpoint": "x"}, grid={"train.lr": [1e-3]}', "grid key 'train.lr' is not a decode config field"),
        ('decode={"checkpoint": "x"}, metric="val_loss"', "metric 'val_loss' is not reported by decode trials"),
        ('decode={"checkpoint": "x"}, train={"lr": 1e-3}', "a decode experiment samples from a trained checkpoint"),
        ('grid={"decode.top_k": [0]}', "decode.checkpoint: is not set"),
        ('decode={"checkpoint": "x"}, grid={"decode.top_p": [0.0]}', "decode.top_p"),
    ],
)
def test_malformed_decode_experiment_gets_one_clear_error(tmp_path, capsys, text, message):
    body = f"from orchestrator import Experiment\nEXPERIMENT = Experiment(name='d', kind='decode', {text}"
    if "grid=" not in text:
        body += ", grid={'decode.temperature': [1.0]}"
    if "metric=" not in text:
        body += ", metric='distinct_2'"
    path = tmp_path / "bad.py"
    path.write_text(body + ")\n")
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_overrides_must_fit_the_experiment_kind(tmp_path, capsys):
    from tests.conftest import REPO  # the experiment file from the repository, whatever the current directory

    assert main(["run", str(write(tmp_path)), "--dry-run", "--set", "train.lr=1e-3"]) == 2
    assert "unknown decode config key" in capsys.readouterr().err
    assert main(["run", str(REPO / "experiments" / "stride_sweep.py"), "--dry-run", "--set", "decode.top_k=5"]) == 2
    assert "decode.top_k: unknown config key" in capsys.readouterr().err


def test_missing_checkpoints_fail_before_ray_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(write(tmp_path, tmp_path / "nope"))]) == 2
    assert "decode.checkpoint: checkpoint" in capsys.readouterr().err
    assert main(["run", str(write(tmp_path, "best:never_ran"))]) == 2
    err = capsys.readouterr().err
    assert "decode.checkpoint best:never_ran: no MLflow experiment named 'never_ran'" in err
    assert not (tmp_path / "ray_results").exists()


def test_a_checkpoint_folder_resolves_to_its_absolute_path(checkpoint, monkeypatch):
    monkeypatch.chdir(checkpoint.parent.parent)
    relative = checkpoint.relative_to(checkpoint.parent.parent)
    assert resolve_checkpoint(str(relative), "sqlite:///unused.db") == str(checkpoint)


def test_sample_and_measure_is_seeded_and_measures_every_sample(checkpoint):
    from gptcore.checkpoint import load_model

    model, _ = load_model(checkpoint)
    config = DecodeConfig(
        str(checkpoint), prompts=["Every effort", "I had"], num_samples=3, max_new_tokens=8, temperature=1.0, top_k=50
    )
    seen = []
    metrics, text = sample_and_measure(model, config, lambda done, elapsed: seen.append(done))
    assert seen == [1, 2]
    assert text.count("--- prompt") == 6 and "--- prompt 2, sample 3\nI had" in text
    assert 0 < metrics["distinct_1"] <= 1 and 0 < metrics["distinct_2"] <= 1 and 0 <= metrics["repetition_rate"] <= 1
    assert metrics["self_perplexity"] > 1 and metrics["mean_new_tokens"] == 8 and metrics["tokens_per_sec"] > 0
    assert sample_and_measure(model, config)[1] == text  # same seed, same samples
    greedy, _ = sample_and_measure(model, DecodeConfig(str(checkpoint), num_samples=3, temperature=0.0))
    assert greedy["distinct_2"] <= 1 / 3  # three identical greedy samples: every bigram at least three times
