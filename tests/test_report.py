"""Report plots of a large sweep stay readable: the best trials named, the rest grey, a bounded panel grid.
The report tells a decode sweep from a training sweep by its parent run's kind tag."""

from PIL import Image

from orchestrator.experiment import Experiment
from orchestrator.report import MAX_PANELS, TrialResult, plot_train_vs_val, plot_val_vs_tokens, ranking
from orchestrator.results import is_decode_sweep, trial_results
from orchestrator.sweep import SweepOptions, _start, make_plan
from orchestrator.tracking import KIND_TAG, SweepTracker


def trials(n: int) -> list[TrialResult]:
    return [
        TrialResult(
            name=f"{i:03d}_stride=32_pos_emb=sinusoidal_freeze_token_embeddings=True_lr=0.0005",
            run_id=str(i),
            status="finished",
            params={},
            best_val_loss=7.0 + i / 10,
            curves={
                "tokens_seen": [(s, s * 512.0) for s in (10, 20, 30)],
                "val_loss": [(s, 9.0 - s / 10 + i / 10) for s in (10, 20, 30)],
                "train_loss": [(s, 8.5 - s / 10 + i / 10) for s in (10, 20, 30)],
            },
        )
        for i in range(n)
    ]


def test_large_sweep_plots_are_bounded(tmp_path):
    small = Image.open(plot_val_vs_tokens(trials(3), tmp_path / "small.png", "3 trials"))
    large = Image.open(plot_val_vs_tokens(trials(36), tmp_path / "large.png", "36 trials"))
    assert large.width > small.width  # the legend moves beside the axes instead of over them
    panels = Image.open(plot_train_vs_val(trials(36), tmp_path / "panels.png", "36 trials"))
    few = Image.open(plot_train_vs_val(trials(MAX_PANELS), tmp_path / "few.png", "9 trials"))
    assert panels.size == few.size  # 36 trials draw the best 9 panels, not 12 rows of 3


def test_the_sweep_kind_is_its_parent_runs_tag(tmp_path):
    """_start tags the parent run with the experiment's kind; the report reads it (no guess from the metrics)."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    experiments = {
        "train": Experiment(name="t", corpus="the-verdict", model="micro", grid={"train.lr": [1e-3]}),
        "decode": Experiment(
            name="d", kind="decode", decode={"checkpoint": "ckpt"}, grid={"decode.top_k": [5]}, metric="distinct_2"
        ),
    }
    for kind, experiment in experiments.items():
        tracker = SweepTracker(uri, experiment.name)
        options = SweepOptions(workdir=str(tmp_path))
        settings = _start(tracker, experiment, options, make_plan(experiment, options), f"{kind}-1", "s", False)
        assert tracker.client.get_run(settings.parent_run_id).data.tags[KIND_TAG] == kind
        tracker.child_run(settings.parent_run_id, f"{kind}-1", "000", params={}, tags={})
        results = trial_results(tracker.client, settings.parent_run_id)  # no metrics yet: nothing to guess from
        assert [r.kind for r in results] == [kind] and is_decode_sweep(results) == (kind == "decode")
    assert ranking(results) == "in grid order"
    # a sweep recorded before the tag: guessed from its metrics (decode metrics and no validation loss)
    old = [TrialResult("000", "1", "finished", {}, self_perplexity=3.0)]
    assert is_decode_sweep(old) and not is_decode_sweep([*old, *trials(1)])
    assert is_decode_sweep([TrialResult("000", "1", "finished", {}, kind="decode")])
