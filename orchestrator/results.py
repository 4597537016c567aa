"""A sweep's results, read back from MLflow: its parent run, one `TrialResult` per trial, the sweep's kind.

Reading only (the report renders them: `orchestrator.report`; a decode sweep finds its checkpoint here:
`orchestrator.decode_plan`). Everything comes from the tracking store, not console output, so it works on a
finished, partial or resumed sweep, and from any machine that can reach the store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mlflow import MlflowClient

from orchestrator.decoding import DECODE_METRICS, is_decode
from orchestrator.tracking import (
    BEST_CHECKPOINT_TAG,
    KIND_TAG,
    PREEMPTIONS_TAG,
    ROLE_TAG,
    STATUS_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    WORKERS_TAG,
)

CURVES = ("val_loss", "train_loss", "tokens_seen")  # metrics read step by step (the report's plots)


class ReportError(RuntimeError):
    """Nothing to report; the message says why."""


@dataclass
class TrialResult:
    name: str
    run_id: str
    status: str
    params: dict[str, str]  # grid values
    best_val_loss: float = math.nan
    final_val_loss: float = math.nan
    final_train_loss: float = math.nan
    tokens_seen: float = math.nan
    tokens_per_sec: float = math.nan
    wall_time_s: float = math.nan
    params_trainable: float = math.nan
    params_total: float = math.nan  # N of a scaling fit (orchestrator.scaling_report)
    distinct_1: float = math.nan  # decode trials (orchestrator.decode_trial)
    distinct_2: float = math.nan
    repetition_rate: float = math.nan
    self_perplexity: float = math.nan
    best_checkpoint: str = ""
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]
    workers: str = ""  # "2", or "1-2 elastic" (WORKERS_TAG; "" for sweeps recorded before it)
    preemptions: float = math.nan  # spot reclaims the trial lived through (orchestrator.preemption)
    kind: str = ""  # the sweep's: train | decode (its parent run's KIND_TAG); "" for sweeps recorded before the tag


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    points = {m.step: m.value for m in client.get_metric_history(run_id, key)}  # last value per step wins
    return sorted(points.items())


def find_parent_run(client: MlflowClient, experiment: str, sweep_id: str | None = None):
    """The parent run of ``experiment``'s sweep ``sweep_id`` (default: its latest sweep)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ReportError(f"no MLflow experiment named {experiment!r} in this tracking store; run the sweep first")
    query = f"tags.`{ROLE_TAG}` = 'sweep'" + (f" and tags.`{SWEEP_TAG}` = '{sweep_id}'" if sweep_id else "")
    runs = client.search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        which = f"sweep {sweep_id!r}" if sweep_id else "any sweep"
        raise ReportError(f"no parent run for {which} of experiment {experiment!r}; run the sweep first")
    return runs[0]


def trial_results(client: MlflowClient, parent_run_id: str) -> list[TrialResult]:
    """Every trial of the sweep, ranked by best validation loss (in grid order for a decode sweep)."""
    parent = client.get_run(parent_run_id)
    kind = parent.data.tags.get(KIND_TAG, "")
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=10_000
    )
    results = []
    for run in runs:
        m, tags = run.data.metrics, run.data.tags
        curves = {key: metric_history(client, run.info.run_id, key) for key in CURVES}
        val = [v for _, v in curves["val_loss"] if math.isfinite(v)]
        results.append(
            TrialResult(
                name=tags.get(TRIAL_TAG, run.info.run_name),
                run_id=run.info.run_id,
                status=tags.get(STATUS_TAG, run.info.status.lower()),
                params={k.removeprefix("grid."): v for k, v in run.data.params.items() if k.startswith("grid.")},
                best_val_loss=min(val) if val else math.nan,
                final_val_loss=m.get("val_loss", math.nan),
                final_train_loss=m.get("train_loss", math.nan),
                tokens_seen=m.get("tokens_seen", math.nan),
                tokens_per_sec=m.get("avg_tokens_per_sec", m.get("tokens_per_sec", math.nan)),
                wall_time_s=m.get("wall_time_s", math.nan),
                **{key: m.get(key, math.nan) for key in ("params_trainable", "params_total", *DECODE_METRICS)},
                best_checkpoint=tags.get(BEST_CHECKPOINT_TAG, tags.get("checkpoint", "")),
                curves=curves,
                workers=tags.get(WORKERS_TAG, ""),
                preemptions=float(tags.get(PREEMPTIONS_TAG, "nan")),
                kind=kind,
            )
        )
    return sorted(results, key=lambda r: (math.isnan(r.best_val_loss), r.best_val_loss, r.name))


def is_decode_sweep(results: list[TrialResult]) -> bool:
    """Whether the results are a decode sweep's: the parent run's kind tag says so.

    Sweeps recorded before the tag are guessed from their metrics (decode metrics, no validation loss).
    """
    kinds = {r.kind for r in results if r.kind}
    if kinds:
        return all(map(is_decode, kinds))
    return any(math.isfinite(r.self_perplexity) for r in results) and all(math.isnan(r.best_val_loss) for r in results)
