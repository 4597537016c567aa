"""System metrics of a trial (CPU, memory, disk, network; GPU where pynvml sees one) with MLflow's own monitor.

`TrialSystemMetrics` is MLflow's `SystemMetricsMonitor` (metrics ``system/...`` in the run, as ``mlflow.start_run(
log_system_metrics=True)`` logs them), started by the rank-0 worker next to `orchestrator.hooks.MlflowLogging`. It
samples every `SAMPLING_INTERVAL_S` seconds from its own thread (BENCHMARKS.md, "System metrics": no measurable cost
to training throughput), and on `finish` logs a last sample, so a trial shorter than the interval still has one.
``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides the interval, as in MLflow.
"""

from __future__ import annotations

from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

SAMPLING_INTERVAL_S = 10.0


class TrialSystemMetrics(SystemMetricsMonitor):
    """MLflow's monitor for one run, with a final sample on `finish`."""

    def __init__(self, run_id: str, tracking_uri: str, sampling_interval: float = SAMPLING_INTERVAL_S):
        # resume_logging: a resumed trial goes on from the run's last system-metrics step
        super().__init__(run_id, sampling_interval=sampling_interval, resume_logging=True, tracking_uri=tracking_uri)

    def finish(self) -> None:
        if self._process is None:
            return
        self._shutdown_event.set()
        self._process.join()
        self._process = None
        try:
            self.collect_metrics()  # what the loop collected since its last publish, and now
            self.publish_metrics(self.aggregate_metrics())
            self.mlflow_logger.flush()
        except Exception as exc:  # a missing sample must not fail a finished trial
            print(f"[mlflow] could not log the last system metrics: {exc}", flush=True)


def start_system_metrics(run_id: str, tracking_uri: str) -> TrialSystemMetrics | None:
    """A started monitor of ``run_id``, or None (with a warning) where it cannot run (e.g. psutil missing)."""
    try:
        monitor = TrialSystemMetrics(run_id, tracking_uri)
        monitor.start()
        return monitor
    except Exception as exc:
        print(f"[mlflow] system metrics off: {type(exc).__name__}: {exc}", flush=True)
        return None
