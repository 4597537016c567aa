"""The report of a sweep: its results (read from MLflow by `orchestrator.results`) as a ranked table and plots.

The table and plots are saved to a folder and logged to the sweep's parent run; a trial's own loss curve is
logged to its run when it ends.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from orchestrator.results import (
    CURVES,
    ReportError,
    TrialResult,
    find_parent_run,
    is_decode_sweep,
    metric_history,
    trial_results,
)
from orchestrator.scaling_report import is_ladder, scaling_report
from orchestrator.tracking import SWEEP_TAG, TRIAL_TAG, client_for


def ranking(results: list[TrialResult]) -> str:
    """How `trial_results` orders the table, in words."""
    return "in grid order" if is_decode_sweep(results) else "ranked by best val loss"


# --------------------------------------------------------------------------- table


# A column appears when at least one trial has its value (decode sweeps have no losses, train sweeps no distinct-n).
COLUMNS = [
    ("best val", "best_val_loss", "{:.3f}"),
    ("final val", "final_val_loss", "{:.3f}"),
    ("final train", "final_train_loss", "{:.3f}"),
    ("trainable params", "params_trainable", "{:,.0f}"),
    ("distinct-1", "distinct_1", "{:.3f}"),
    ("distinct-2", "distinct_2", "{:.3f}"),
    ("repetition", "repetition_rate", "{:.3f}"),
    ("self ppl", "self_perplexity", "{:.2f}"),
    ("tokens", "tokens_seen", "{:,.0f}"),
    ("tok/s", "tokens_per_sec", "{:,.0f}"),
    ("wall s", "wall_time_s", "{:.0f}"),
    ("preemptions", "preemptions", "{:.0f}"),
]


def table_rows(results: list[TrialResult]) -> tuple[list[str], list[list[str]]]:
    axes = sorted({k for r in results for k in r.params})
    columns = [c for c in COLUMNS if any(math.isfinite(getattr(r, c[1])) for r in results)]
    checkpoint = "checkpoint" if is_decode_sweep(results) else "best checkpoint"
    elastic = any("elastic" in r.workers for r in results)  # then each trial's range is said
    header = ["rank", "trial", *axes, "status", *(["workers"] if elastic else []), *[c[0] for c in columns], checkpoint]
    rows = []
    for rank, r in enumerate(results, 1):
        values = [fmt.format(getattr(r, attr)) if math.isfinite(getattr(r, attr)) else "-" for _, attr, fmt in columns]
        workers = [r.workers] if elastic else []
        rows.append(
            [str(rank), r.name, *[r.params.get(a, "") for a in axes], r.status, *workers, *values, r.best_checkpoint]
        )
    return header, rows


def format_table(results: list[TrialResult]) -> str:
    """A plain-text table, one row per trial, ranked by best validation loss."""
    header, rows = table_rows(results)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(results: list[TrialResult]) -> str:
    header, rows = table_rows(results)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def csv_table(results: list[TrialResult]) -> str:
    header, rows = table_rows(results)
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *rows])
    return buffer.getvalue()


# --------------------------------------------------------------------------- plots


# Trials drawn in colour and named in the legend (the best ones); the rest of a large sweep is drawn in grey.
MAX_NAMED = 8
MAX_PANELS = 9


def _points(result: TrialResult, key: str) -> list[tuple[float, float]]:
    """(tokens seen, value) of metric ``key`` at every step it was logged."""
    tokens = dict(result.curves.get("tokens_seen", []))
    return [(tokens.get(step, math.nan), v) for step, v in result.curves.get(key, [])]


def plot_val_vs_tokens(results: list[TrialResult], path: Path, title: str) -> Path:
    """Validation loss against tokens seen, every trial on one figure; the best `MAX_NAMED` named in the legend."""
    fig, ax = plt.subplots(figsize=(11, 5) if len(results) > MAX_NAMED else (8, 5))
    others = [points for r in results[MAX_NAMED:] if (points := _points(r, "val_loss"))]
    for i, points in enumerate(others):
        label = f"{len(others)} other trials" if i == 0 else None
        ax.plot(*zip(*points, strict=True), color="0.75", linewidth=0.8, zorder=1, label=label)
    for r in results[:MAX_NAMED]:
        if points := _points(r, "val_loss"):
            ax.plot(*zip(*points, strict=True), marker="o", markersize=3, label=r.name, zorder=2)
    ax.set(xlabel="tokens seen", ylabel="validation loss", title=title)
    ax.grid(alpha=0.3)
    if others:  # long lists of long names go beside the plot, not over it
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_train_vs_val(results: list[TrialResult], path: Path, title: str) -> Path:
    """Train and validation loss per trial (one panel each, the best `MAX_PANELS`), against tokens seen."""
    shown = results[:MAX_PANELS]
    n = max(len(shown), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, r in zip(axes.flat, shown, strict=False):
        for key, style in (("train_loss", "-"), ("val_loss", "--")):
            if points := _points(r, key):
                ax.plot(*zip(*points, strict=True), style, label=key.replace("_", " "))
        ax.set(title=r.name, xlabel="tokens seen", ylabel="loss")
        ax.title.set_fontsize(8 if len(r.name) > 40 else 10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.suptitle(title if len(results) <= MAX_PANELS else f"{title} (best {MAX_PANELS} of {len(results)} trials)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_diversity_vs_perplexity(results: list[TrialResult], path: Path, title: str) -> Path:
    """A decode sweep: distinct-2 (diversity) against the model's own perplexity of its samples, one point a trial."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        if math.isfinite(r.distinct_2) and math.isfinite(r.self_perplexity):
            point = (r.self_perplexity, r.distinct_2)
            ax.scatter(*point)
            ax.annotate(r.name, point, fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="self-perplexity of the samples (log scale)", ylabel="distinct-2", title=title, xscale="log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_trial_curve(tracking_uri: str, run_id: str) -> None:
    """The trial's train/val loss curve as ``loss_curve.png`` on its own run."""
    client = client_for(tracking_uri)
    run = client.get_run(run_id)
    result = TrialResult(run.data.tags.get(TRIAL_TAG, run.info.run_name), run_id, "", {})
    result.curves = {k: metric_history(client, run_id, k) for k in CURVES}
    with tempfile.TemporaryDirectory() as tmp:
        path = plot_train_vs_val([result], Path(tmp) / "loss_curve.png", result.name)
        client.log_artifact(run_id, str(path))


# --------------------------------------------------------------------------- the report


def write_report(
    tracking_uri: str,
    experiment: str,
    sweep_id: str | None = None,
    out_dir: str | Path | None = None,
    predict_flops: float | None = None,
) -> dict[str, Any]:
    """Build the table and plots of a sweep (and a scaling ladder's fits: `orchestrator.scaling_report`, with the
    law's allocation for ``predict_flops`` FLOPs), save them (to ``out_dir`` if given) and log them to its parent
    run."""
    client = client_for(tracking_uri)
    parent = find_parent_run(client, experiment, sweep_id)
    sweep = parent.data.tags.get(SWEEP_TAG, parent.info.run_name)
    results = trial_results(client, parent.info.run_id)
    if not results:
        raise ReportError(f"sweep {sweep} has no trial runs yet")
    if predict_flops is not None and not is_ladder(results):
        raise ReportError(
            f"sweep {sweep} is not a scaling ladder (no finished trial with a train.flops_budget grid value), so "
            "there is no law to predict with; leave --predict-flops out, or report a ladder "
            "(experiments/scaling_ladder.py)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        files = {
            "results.md": markdown_table(results),
            "results.csv": csv_table(results),
            "results.txt": format_table(results),
        }
        for name, text in files.items():
            (folder / name).write_text(text + "\n")
        scaling = None
        if is_decode_sweep(results):
            plots = [plot_diversity_vs_perplexity(results, folder / "diversity_vs_perplexity.png", sweep)]
        else:
            scaling = scaling_report(results, folder, predict_flops)  # None unless the sweep is a scaling ladder
            plots = [
                plot_val_vs_tokens(results, folder / "val_loss_vs_tokens.png", f"{sweep}: validation loss"),
                plot_train_vs_val(results, folder / "train_vs_val.png", f"{sweep}: train vs validation loss"),
            ]
        for name in [*files, *(p.name for p in plots), *(scaling.files if scaling else ())]:
            client.log_artifact(parent.info.run_id, str(folder / name), artifact_path="report")
        for key, value in (scaling.metrics() if scaling else {}).items():
            client.log_metric(parent.info.run_id, key, value)
        table = format_table(results)
        if scaling:  # a ladder's fits follow its table wherever the table is printed
            table += "\n\n" + (folder / "scaling.txt").read_text().rstrip()
        best = results[0]
        if math.isfinite(best.best_val_loss):
            client.log_metric(parent.info.run_id, "best_val_loss", best.best_val_loss)
            client.set_tag(parent.info.run_id, "best_trial", best.name)
    return {
        "sweep": sweep,
        "parent_run_id": parent.info.run_id,
        "results": results,
        "table": table,
        "ranking": ranking(results),
        "scaling": scaling,
    }
