"""MLflow: one parent run per sweep, one child run per trial, metrics shipped without stalling training.

Defaults need no server: a SQLite store and an artifact folder under the working directory,
both as absolute URIs because Ray workers run in other directories. Any tracking server URI
works the same way. Metrics, samples and tags from a worker go through a `RunLogger`, a
background thread that batches them and keeps retrying while the store is unreachable, so an
outage delays metrics (and is reported) instead of losing them or blocking training.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import threading
import time
import urllib.parse
from collections import deque
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException

from orchestrator.storage import is_uri

ROLE_TAG = "orchestrator.role"  # "sweep" | "trial"
SWEEP_TAG = "orchestrator.sweep_id"
TRIAL_TAG = "orchestrator.trial"
STATUS_TAG = "orchestrator.status"  # running | finished | diverged | failed | stopped
KIND_TAG = "orchestrator.kind"  # a sweep's parent run: "train" | "decode" (the experiment's kind)
BEST_CHECKPOINT_TAG = "best_checkpoint"
WORKERS_TAG = "workers"  # a training trial's workers: "2", or "1-2 elastic"
PREEMPTIONS_TAG = "preemptions"  # the spot reclaims a trial lived through (orchestrator.preemption)
NOTE_TAG = "mlflow.note.content"  # the description the MLflow UI shows for an experiment or a run
# Fail fast on an unreachable server; the RunLogger retries on its own schedule.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def mlflow_server_env() -> dict[str, str]:
    """The environment for ``mlflow server``: without its job runner unless the user asks for it.

    MLflow 3 starts a job runner and its Huey consumers beside the UI, for GenAI evaluation jobs that training runs
    never use: Python processes that each pay MLflow's imports at every start.
    ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true`` brings them back.
    """
    return {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says how to fix it."""


def resolve_tracking_uri(given: str | None = None, workdir: str | Path = ".") -> str:
    """The tracking store a command uses: ``given`` made absolute (`absolute_uri`), else the SQLite file
    ``<workdir>/mlruns.db``."""
    return absolute_uri(given or "sqlite:///mlruns.db", workdir)


def default_artifact_root(workdir: str | Path = ".") -> str:
    return (Path(workdir).absolute() / "mlartifacts").as_uri()


def absolute_uri(uri: str, workdir: str | Path = ".") -> str:
    """A relative SQLite file or folder made absolute against ``workdir`` (workers do not share the driver's cwd);
    any other URI as it is."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(workdir, uri[len('sqlite:///') :]).absolute()}"
    if "://" not in uri:
        return Path(workdir, uri).absolute().as_uri()
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail before any trial starts if an HTTP tracking server does not answer."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({exc}); start it (e.g. mlflow server --host 127.0.0.1 "
            f"--port {port}), fix --tracking-uri, or leave it out to use the local SQLite store"
        ) from None


# How long the end of a trial or of a sweep waits for a tracking server that went down: their results are recorded
# there, and a server restarted within minutes should cost nothing.
STORE_PATIENCE_S = 600.0


def wait_until_reachable(uri: str, patience_s: float = STORE_PATIENCE_S) -> None:
    """Return once the tracking server at ``uri`` answers (at once for a local store); print once while it does not,
    and raise `TrackingError` after ``patience_s``."""
    if urllib.parse.urlparse(uri).scheme not in ("http", "https"):
        return
    client, deadline, said = client_for(uri), time.monotonic() + patience_s, False
    while True:
        try:
            client.search_experiments(max_results=1)
            break
        except Exception as exc:  # refused, timed out, 5xx: the server is down or restarting
            if time.monotonic() > deadline:
                raise TrackingError(
                    f"MLflow tracking server {uri} has not answered for {patience_s:.0f} s "
                    f"({type(exc).__name__}); the trials' checkpoints are kept in storage: once the server is back, "
                    "record their results with python -m orchestrator run EXPERIMENT_FILE --resume"
                ) from None
            if not said:
                print(
                    f"[mlflow] tracking server {uri} unreachable; waiting for it to record the results "
                    f"(up to {patience_s:.0f} s)",
                    flush=True,
                )
                said = True
            time.sleep(2.0)
    if said:
        print(f"[mlflow] tracking server {uri} is back", flush=True)


def is_loopback(host: str | None) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def cluster_tracking_uri(uri: str, node_ip: str) -> str:
    """A loopback http(s) tracking URI as ``node_ip`` (the driver's node), so trials on other nodes reach it.

    Rewritten only when the server answers there too; a server bound to loopback only keeps its URI (with a warning).
    """
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme not in ("http", "https") or not is_loopback(parsed.hostname) or is_loopback(node_ip):
        return uri
    host = f"[{node_ip}]" if ":" in node_ip else node_ip
    routable = parsed._replace(netloc=f"{host}:{parsed.port}" if parsed.port else host).geturl()
    try:
        check_reachable(routable, timeout=2)
    except TrackingError:
        print(
            f"warning: the MLflow server {uri} does not answer on {node_ip}: trials on other nodes cannot log to it; "
            "start it with --host 0.0.0.0 (behind a firewall) or forward the port on every node",
            flush=True,
        )
        return uri
    return routable


def client_for(uri: str) -> MlflowClient:
    for key, value in HTTP_ENV.items():
        os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri=uri)


def _quote(value: str) -> str:
    return value.replace("'", "\\'")


# --------------------------------------------------------------------------- sweep and trial runs


EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


class SweepTracker:
    """Creates (or, on resume, finds) the sweep's parent run and its trials' child runs."""

    def __init__(self, tracking_uri: str, experiment_name: str, *, artifact_root: str | None = None):
        self.uri = tracking_uri
        self.artifact_root = artifact_root
        self.client = client_for(tracking_uri)
        self.experiment_id = self._experiment_id(experiment_name, artifact_root)

    def _experiment_id(self, name: str, artifact_root: str | None) -> str:
        try:
            existing = self.client.get_experiment_by_name(name)
            if existing is not None:
                if existing.lifecycle_stage == "deleted":
                    self.client.restore_experiment(existing.experiment_id)
                return existing.experiment_id
            location = f"{artifact_root.rstrip('/')}/{name}" if artifact_root else None
            # The UI opens a "model training" experiment on its runs table (not on the GenAI traces overview).
            return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except MlflowException as exc:
            raise TrackingError(f"cannot use MLflow tracking store {self.uri}: {exc}") from None

    def _find(self, filter_string: str) -> str | None:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string, run_view_type=ViewType.ACTIVE_ONLY, max_results=1
        )
        return runs[0].info.run_id if runs else None

    def parent_run(self, sweep_id: str, *, params: dict[str, Any], tags: dict[str, str]) -> str:
        """The sweep's parent run, created once and reused on resume."""
        found = self._find(f"tags.`{SWEEP_TAG}` = '{_quote(sweep_id)}' and tags.`{ROLE_TAG}` = 'sweep'")
        if found:
            self.client.update_run(found, status="RUNNING")
            return found
        run = self.client.create_run(
            self.experiment_id, run_name=sweep_id, tags={ROLE_TAG: "sweep", SWEEP_TAG: sweep_id, **tags}
        )
        self.client.log_batch(run.info.run_id, params=[Param(k, _param(v)) for k, v in params.items()])
        return run.info.run_id

    def child_run(self, parent_id: str, sweep_id: str, trial: str, *, params: dict[str, Any], tags: dict[str, str]):
        """The trial's child run (status pending until a worker starts it; reused on resume); returns its id."""
        found = self._find(f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{_quote(trial)}'")
        if found:
            return found
        run = self.client.create_run(
            self.experiment_id,
            run_name=trial,
            tags={
                "mlflow.parentRunId": parent_id,
                ROLE_TAG: "trial",
                SWEEP_TAG: sweep_id,
                TRIAL_TAG: trial,
                STATUS_TAG: "pending",
                **tags,
            },
        )
        items = [Param(k, _param(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run.info.run_id, params=items[start : start + 100])
        return run.info.run_id

    def log_dataset(self, run_id: str, *, name: str, key: str, location: str, profile: dict[str, Any]) -> None:
        """Record the prepared dataset a run trains on as its MLflow dataset input (the UI's Dataset column)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        source = {"uri": location} if is_uri(location) else {"path": location}
        dataset = Dataset(
            name=name,
            digest=key[:36],
            source_type="s3" if location.startswith("s3://") else "local",
            source=json.dumps(source),
            profile=json.dumps(profile),
        )
        self.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])

    def describe_experiment(self, text: str) -> None:
        """The experiment's description in the MLflow UI (its ``mlflow.note.content`` tag)."""
        if text:
            self.client.set_experiment_tag(self.experiment_id, NOTE_TAG, text)

    def child_runs(self, parent_id: str) -> list:
        return self.client.search_runs(
            [self.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10_000
        )

    def finish(self, run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
        """Record a trial's or sweep's outcome: finished, diverged, failed or stopped."""
        for key, value in (tags or {}).items():
            self.client.set_tag(run_id, key, value)
        self.client.set_tag(run_id, STATUS_TAG, status)
        self.client.set_terminated(run_id, mlflow_status(status))


def mlflow_status(status: str) -> str:
    """The MLflow run status of an outcome (finished, diverged, stopped, failed)."""
    return {"finished": "FINISHED", "diverged": "FINISHED", "stopped": "KILLED"}.get(status, "FAILED")


def _param(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


# --------------------------------------------------------------------------- worker-side logging


class RunLogger:
    """Ships metrics, tags and text artifacts of one run from a background thread.

    Items are kept in order and retried until the store accepts them. While the store is
    unreachable, training goes on and a warning names the outage; when it comes back, the
    buffered items are delivered and the run gets a ``tracking_gap`` tag describing the gap.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, flush_every: float = 2.0, skip_steps_upto: int = -1):
        self.client = client_for(tracking_uri)
        self.run_id = run_id
        self.flush_every = flush_every
        self.skip_steps_upto = skip_steps_upto  # steps already logged by an earlier attempt (resume)
        self._pending: deque[tuple[str, Any]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._outage_since: float | None = None
        self._outage_items = 0
        self.gaps: list[str] = []
        self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self._thread.start()

    @classmethod
    def last_logged_step(cls, tracking_uri: str, run_id: str, key: str = "loss") -> int:
        """Highest step of ``key`` already in the run (-1 if none)."""
        history = client_for(tracking_uri).get_metric_history(run_id, key)
        return max((m.step for m in history), default=-1)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.skip_steps_upto:
            return
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        with self._lock:
            self._pending.append(("metrics", items))

    def log_text(self, text: str, artifact_file: str) -> None:
        with self._lock:
            self._pending.append(("text", (text, artifact_file)))

    def set_tags(self, tags: dict[str, str]) -> None:
        with self._lock:
            self._pending.append(("tags", [RunTag(k, str(v)) for k, v in tags.items()]))

    @property
    def outage(self) -> bool:
        """True while the store is unreachable (items are being buffered)."""
        return self._outage_since is not None

    def flush(self, timeout: float = 30.0, *, unless_outage: bool = False) -> bool:
        """Wait until everything queued is delivered (or ``timeout``; or, with ``unless_outage``, until the store is
        found unreachable: training need not wait for it); True when nothing is left."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            if unless_outage and self.outage:
                return False
            self._wake.set()
            time.sleep(0.05)
        return False

    def close(self, timeout: float = 30.0) -> None:
        delivered = self.flush(timeout)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)
        if not delivered:
            with self._lock:
                left = len(self._pending)
            print(
                f"[mlflow] WARNING: {left} logging batches for run {self.run_id} could not be delivered "
                f"(tracking store unreachable); they are lost",
                flush=True,
            )

    # -- background thread

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.flush_every)
            self._wake.clear()
            self._ship()

    def _ship(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
                kind, payload = self._pending[0]
                if kind == "metrics":  # merge consecutive metric batches, up to MLflow's 1000 per call
                    batch = list(payload)
                    n = 1
                    while n < len(self._pending) and self._pending[n][0] == "metrics" and len(batch) < 900:
                        batch += self._pending[n][1]
                        n += 1
                    payload = batch
                else:
                    n = 1
            try:
                if kind == "metrics":
                    self.client.log_batch(self.run_id, metrics=payload)
                elif kind == "tags":
                    self.client.log_batch(self.run_id, tags=payload)
                else:
                    self.client.log_text(self.run_id, *payload)
            except Exception as exc:  # network errors, 5xx, locked database: keep and retry later
                if self._outage_since is None:
                    self._outage_since = time.time()
                    print(
                        f"[mlflow] WARNING: tracking store unreachable ({type(exc).__name__}: {str(exc)[:120]}); "
                        "training continues, metrics are buffered and retried",
                        flush=True,
                    )
                return
            with self._lock:
                for _ in range(n):
                    self._pending.popleft()
            if self._outage_since is not None:
                self._outage_items += n
                if not self._pending:
                    self._report_gap()

    def _report_gap(self) -> None:
        seconds = time.time() - (self._outage_since or time.time())
        gap = (
            f"tracking store unreachable for {seconds:.0f}s from "
            f"{time.strftime('%H:%M:%S', time.localtime(self._outage_since))}; "
            f"{self._outage_items} buffered batches delivered late, none lost"
        )
        self.gaps.append(gap)
        print(f"[mlflow] {gap}", flush=True)
        self._outage_since, self._outage_items = None, 0
        with contextlib.suppress(Exception):
            self.client.set_tag(self.run_id, "tracking_gap", "; ".join(self.gaps))
