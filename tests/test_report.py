"""Report plots of a large sweep stay readable: the best trials named, the rest grey, a bounded panel grid.
The report tells a decode sweep from a training sweep by its parent run's kind tag."""

from PIL import Image

from orchestrator.experiment import Experiment
from orchestrator.plan import SweepOptions, make_plan
from orchestrator.report import MAX_PANELS, TrialResult, plot_train_vs_val, plot_val_vs_tokens, ranking
from orchestrator.results import is_decode_sweep, trial_results
from orchestrator.sweep_runs import start_sweep_run
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


# --------------------------------------------------------------------------- ranking


def test_trials_are_ranked_by_best_val_loss(tmp_path):
    """The table ranks trials by their best validation loss (not the last, not grid order), ties by name, trials
    without one last; results.md/.csv/.txt, the returned results and the parent's best_trial all keep that order."""
    import csv
    import math

    from mlflow.entities import Metric

    from orchestrator.report import write_report
    from orchestrator.tracking import SweepTracker

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracker = SweepTracker(uri, "ranking")
    parent = tracker.parent_run("sweep1", params={}, tags={})
    val_losses = {  # trial -> validation losses at steps 10, 20, ...
        "000_lr=1": [5.0, 4.0, 4.5],  # best 4.0 (tie with 004: the name decides), last 4.5
        "001_lr=2": [4.8, 4.2],  # best 4.2 but the best last value
        "002_lr=3": [3.9, math.nan],  # diverged after its best
        "003_lr=4": [],  # failed before its first evaluation
        "004_lr=5": [4.0],
    }
    for i, (trial, losses) in enumerate(val_losses.items()):
        run_id = tracker.child_run(parent, "sweep1", trial, params={"grid.lr": i + 1}, tags={})
        metrics = [Metric("val_loss", v, 0, 10 * (s + 1)) for s, v in enumerate(losses)]
        metrics += [Metric("tokens_seen", 320.0 * (s + 1), 0, 10 * (s + 1)) for s in range(len(losses))]
        tracker.client.log_batch(run_id, metrics=metrics)
        tracker.finish(run_id, "diverged" if trial.startswith("002") else "failed" if not losses else "finished")
    ranked = ["002_lr=3", "000_lr=1", "004_lr=5", "001_lr=2", "003_lr=4"]

    report = write_report(uri, "ranking", out_dir=tmp_path / "report")
    assert [r.name for r in report["results"]] == ranked
    assert [r.best_val_loss for r in report["results"]][:4] == [3.9, 4.0, 4.0, 4.2]
    assert report["ranking"] == "ranked by best val loss"

    def column(rows, name):
        header, *body = rows
        return [row[header.index(name)] for row in body]

    md = [[c.strip() for c in line.strip("|").split("|")] for line in (tmp_path / "report" / "results.md").open()]
    md = [md[0], *md[2:]]  # without the |---| line
    assert column(md, "trial") == ranked and column(md, "rank") == ["1", "2", "3", "4", "5"]
    assert column(md, "best val") == ["3.900", "4.000", "4.000", "4.200", "-"]
    assert column(md, "status") == ["diverged", "finished", "finished", "finished", "failed"]
    csv_rows = [row for row in csv.reader((tmp_path / "report" / "results.csv").open()) if row]
    assert column(csv_rows, "trial") == ranked
    text = [line.split() for line in report["table"].splitlines()]
    assert [row[1] for row in text[2:]] == ranked and [row[0] for row in text[2:]] == ["1", "2", "3", "4", "5"]
    run = tracker.client.get_run(parent)
    assert run.data.tags["best_trial"] == "002_lr=3" and run.data.metrics["best_val_loss"] == 3.9


def test_plots_name_the_best_trials_in_rank_order(monkeypatch, tmp_path):
    """The legend names the first MAX_NAMED trials of the ranking (best first), the panels show the first MAX_PANELS."""
    import orchestrator.report as report
    from orchestrator.report import MAX_NAMED

    figures, close = [], report.plt.close
    monkeypatch.setattr(report.plt, "close", figures.append)  # keep the figures to read them
    ranked = trials(12)[::-1]  # any order: the plots follow the order they are given (the ranking)
    plot_val_vs_tokens(ranked, tmp_path / "val.png", "12 trials")
    plot_train_vs_val(ranked, tmp_path / "panels.png", "12 trials")
    legend, panels = figures
    labels = [t.get_text() for t in legend.axes[0].get_legend().get_texts()]
    assert labels == ["4 other trials", *[r.name for r in ranked[:MAX_NAMED]]]
    assert [ax.get_title() for ax in panels.axes if ax.get_title()] == [r.name for r in ranked[:MAX_PANELS]]
    for figure in figures:
        close(figure)


def test_large_sweep_plots_are_bounded(tmp_path):
    small = Image.open(plot_val_vs_tokens(trials(3), tmp_path / "small.png", "3 trials"))
    large = Image.open(plot_val_vs_tokens(trials(36), tmp_path / "large.png", "36 trials"))
    assert large.width > small.width  # the legend moves beside the axes instead of over them
    panels = Image.open(plot_train_vs_val(trials(36), tmp_path / "panels.png", "36 trials"))
    few = Image.open(plot_train_vs_val(trials(MAX_PANELS), tmp_path / "few.png", "9 trials"))
    assert panels.size == few.size  # 36 trials draw the best 9 panels, not 12 rows of 3


def test_the_sweep_kind_is_its_parent_runs_tag(tmp_path):
    """The sweep's parent run is tagged with the experiment's kind; the report reads it (no guess from the metrics)."""
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
        plan = make_plan(experiment, options)
        settings = start_sweep_run(tracker, experiment, options, plan, f"{kind}-1", "s", False)
        assert tracker.client.get_run(settings.parent_run_id).data.tags[KIND_TAG] == kind
        tracker.child_run(settings.parent_run_id, f"{kind}-1", "000", params={}, tags={})
        results = trial_results(tracker.client, settings.parent_run_id)  # no metrics yet: nothing to guess from
        assert [r.kind for r in results] == [kind] and is_decode_sweep(results) == (kind == "decode")
    assert ranking(results) == "in grid order"
    # a sweep recorded before the tag: guessed from its metrics (decode metrics and no validation loss)
    old = [TrialResult("000", "1", "finished", {}, self_perplexity=3.0)]
    assert is_decode_sweep(old) and not is_decode_sweep([*old, *trials(1)])
    assert is_decode_sweep([TrialResult("000", "1", "finished", {}, kind="decode")])
