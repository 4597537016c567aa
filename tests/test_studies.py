"""Every experiment file of ``experiments/`` end to end (`tests.studies`, the session's ``studies`` fixture), then
the MLflow UI: ``python -m orchestrator ui`` serves the store and headless Chromium (Playwright) opens it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.faults import TOKENS_PER_STEP, assert_generates
from tests.servers import free_port, stop
from tests.studies import FSDP_EVERY, FSDP_STEPS, FSDP_TRIAL, REPO, STOPPED, STUDIES, TRIALS, sweep_runs

pytestmark = pytest.mark.ray
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", REPO / "test-artifacts"))


def test_every_experiment_file_is_exercised():
    assert sorted([*STUDIES, "decoding_sweep"]) == sorted(p.stem for p in (REPO / "experiments").glob("*.py"))


@pytest.mark.parametrize("experiment", [*STUDIES, "decoding_sweep"])
def test_study_runs_end_to_end(studies, experiment):
    work, outcomes = studies
    rc, out = outcomes[experiment]
    assert rc == 0, out[-5000:]
    assert f"Results of sweep {experiment}-" in out
    client, parent, kids = sweep_runs(work, experiment)
    assert parent.info.status == "FINISHED" and len(kids) == TRIALS.get(experiment, 2)
    for name, kid in kids.items():
        assert kid.data.tags["orchestrator.status"] == (
            "stopped" if name in STOPPED.get(experiment, []) else "finished"
        )
        assert kid.data.metrics, f"{name}: no metric from its worker in the sweep's tracking store"
    artifacts = [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert "report/results.md" in artifacts and any(a.endswith(".png") for a in artifacts)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "cpus_beyond_the_largest_node",
            "each worker asks for 4 CPUs but the largest node of the Ray cluster has 2; pass --cpus-per-worker 2",
        ),
        ("gpu_on_a_cluster_without", "use_gpu is set but the Ray cluster has no GPU; run without --use-gpu"),
    ],
)
def test_what_only_the_cluster_reveals_is_refused_before_anything_is_written(studies, case, message):
    work, outcomes = studies
    rc, out = outcomes[case]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and message in errors[0], out[-3000:]
    assert "Traceback" not in out
    assert sorted(p.name for p in (work / case).iterdir()) == []  # no ray_results, mlruns.db, mlartifacts


def test_asha_stopped_trial_keeps_its_metrics_and_the_next_trial_finishes(studies):
    """Stopping a trial kills its worker: all it logged up to the evaluation ASHA stopped it on is in MLflow."""
    work, _ = studies
    client, _, kids = sweep_runs(work, "lr_sweep")
    assert steps_of(client, kids["000_lr=0.0005"], "val_loss") == [4, 8, 12, 16, 20, 24]
    # the trial after the stopped one starts (in a fresh trial actor: the stopped trial's is not reused) and finishes
    assert steps_of(client, kids["002_lr=0.001"], "val_loss") == [4, 8, 12, 16, 20, 24]
    for name in STOPPED["lr_sweep"]:
        assert steps_of(client, kids[name], "val_loss")[:5] == [4, 8, 12, 16, 20], name
        assert steps_of(client, kids[name], "loss")[:20] == list(range(1, 21)), name


def steps_of(client: MlflowClient, run, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def test_a_killed_fsdp_worker_resumes_from_the_sharded_checkpoint(studies):
    """FSDP through Ray Train: the 2-worker gpt2_xl_fsdp trial lost its rank-1 worker at step 20; the group resumed
    from the sharded checkpoint, every step logged once."""
    from gptcore.checkpoint_format import read_meta

    work, outcomes = studies
    rc, out = outcomes["gpt2_xl_fsdp"]
    assert rc == 0, out[-4000:]
    resumed = int(re.search(rf"\[{FSDP_TRIAL}\] .*2 worker\(s\) on cpu, resumed from step (\d+)", out).group(1))
    assert resumed in (10, 20), resumed
    client, _, kids = sweep_runs(work, "gpt2_xl_fsdp")
    run = kids[FSDP_TRIAL]
    assert run.data.tags["resumed_from_step"] == str(resumed) and run.data.params["train.parallel"] == "fsdp"
    assert steps_of(client, run, "loss") == list(range(1, FSDP_STEPS + 1))  # every step once
    tokens = client.get_metric_history(run.info.run_id, "tokens_seen")
    per_step = 2 * TOKENS_PER_STEP  # 2 workers x batch 2 x context 32
    assert sorted((m.step, m.value) for m in tokens) == [(s, s * per_step) for s in range(1, FSDP_STEPS + 1)]
    # the checkpoints are sharded: both ranks' shards and rank 0's metadata in one folder
    best = run.data.tags["best_checkpoint"]
    meta = read_meta(best)
    assert meta["layout"] == "sharded" and meta["world_size"] == 2 and meta["state"]["step"] % FSDP_EVERY == 0
    assert len([name for name in meta["files"] if name.startswith("shards/")]) == 2
    assert_generates(best)


def test_frozen_embeddings_train_fewer_parameters(studies):
    work, _ = studies
    _, _, kids = sweep_runs(work, "freeze_embeddings")
    trainable = {k: v.data.metrics["params_trainable"] for k, v in kids.items()}
    total = {k: v.data.metrics["params_total"] for k, v in kids.items()}
    frozen = "000_freeze_token_embeddings=True"
    assert total[frozen] - trainable[frozen] == 50257 * 32  # the token embedding table of the micro preset
    _, _, others = sweep_runs(work, "stride_sweep")
    assert all(k.data.metrics["params_trainable"] == k.data.metrics["params_total"] for k in others.values())


def test_each_ladder_trial_spends_its_budget_and_the_report_says_what_it_fitted(studies):
    """Three sizes on one budget: each trial stops at the steps the budget buys (the largest sooner), and the report
    holds the scaling files: one budget is too few for a fit, which it says rather than inventing one."""
    work, outcomes = studies
    client, parent, kids = sweep_runs(work, "scaling_ladder")
    steps = {
        name: max(m.step for m in client.get_metric_history(kid.info.run_id, "loss")) for name, kid in kids.items()
    }
    assert steps == {
        "000_d_model=32_flops_budget=2.2e+10": 4,
        "001_d_model=48_flops_budget=2.2e+10": 2,
        "002_d_model=64_flops_budget=2.2e+10": 2,
    }
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/scaling.json", "report/scaling.txt", "report/frontier.png", "report/loss_vs_params.png"} <= report
    (work / "ladder").mkdir(exist_ok=True)
    text = Path(client.download_artifacts(parent.info.run_id, "report/scaling.txt", str(work / "ladder"))).read_text()
    assert "Approach 3 (parametric): not fitted" in text and "Approach 2 (iso-FLOP profiles): not fitted" in text
    assert "Approach 3" in outcomes["scaling_ladder"][1]  # the fits follow the results table on the console


def test_warm_arm_starts_from_the_pretrained_weights(studies):
    work, _ = studies
    _, _, kids = sweep_runs(work, "warmstart_vs_scratch")
    (warm,) = kids.values()
    _, _, others = sweep_runs(work, "stride_sweep")
    assert warm.data.tags["init_from"].endswith("hf-gpt2-micro")
    assert all(k.data.tags["init_from"] == "scratch" for k in others.values())
    assert any(key.startswith("init.") for key in warm.data.tags)  # the load report


def test_decoding_sweep_logs_diversity_and_samples(studies):
    work, outcomes = studies
    client, _, kids = sweep_runs(work, "decoding_sweep")
    assert len(kids) == 2  # 2 temperatures, top-k 40
    for name, kid in kids.items():
        m = kid.data.metrics
        assert 0 < m["distinct_1"] <= 1 and 0 < m["distinct_2"] <= 1 and 0 <= m["repetition_rate"] <= 1, name
        assert math.isfinite(m["self_perplexity"]) and m["self_perplexity"] > 1, name
        assert "/stride_sweep-" in kid.data.tags["checkpoint"]  # best:stride_sweep, resolved
        path = client.download_artifacts(kid.info.run_id, "samples.txt", str(work / "dl" / name))
        assert Path(path).read_text().count("Every effort moves you") == 2
    assert "distinct-2" in outcomes["decoding_sweep"][1] and "self ppl" in outcomes["decoding_sweep"][1]


# --------------------------------------------------------------------------- the main job's sweep in detail


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_stride_sweep_tune_trials_and_sweep_state(studies):
    from ray.tune import ExperimentAnalysis

    work, _ = studies
    (sweep_dir,) = (work / "ray_results").glob("stride_sweep-*")
    assert sorted(t.status for t in ExperimentAnalysis(str(sweep_dir)).trials) == ["TERMINATED", "TERMINATED"]
    settings = json.loads((sweep_dir / "sweep.json").read_text())["settings"]
    assert settings["tracking_uri"].startswith("sqlite:////") and settings["cpus_per_worker"] == 1


def test_child_runs_have_params_tags_and_every_step(studies):
    work, _ = studies
    client, parent, kids = sweep_runs(work, "stride_sweep")
    assert parent.data.tags["orchestrator.status"] == "finished"
    for name, stride in (("000_stride=256", "256"), ("001_stride=128", "128")):
        kid = kids[name]
        assert kid.info.status == "FINISHED" and kid.info.run_name == name
        params = kid.data.params
        assert params["data.stride"] == stride and params["grid.data.stride"] == stride
        assert params["model.d_model"] == "32" and params["train.lr"] == "0.0004" and params["train.seed"] == "123"
        for tag in ("seed", "experiment_file", "host", "ray_trial_id", "best_checkpoint", "git_commit"):
            assert kid.data.tags.get(tag), tag
        assert [m.step for m in client.get_metric_history(kid.info.run_id, "loss")] == [1, 2, 3, 4]  # once each
        assert [m.step for m in client.get_metric_history(kid.info.run_id, "val_loss")] == [2, 4]
        for key in ("lr", "tokens_seen", "tokens_per_sec", "val_perplexity", "train_loss"):
            assert client.get_metric_history(kid.info.run_id, key), key
        assert [a.path for a in client.list_artifacts(kid.info.run_id, "samples")] == ["samples/step_000004.txt"]
        text = Path(client.download_artifacts(kid.info.run_id, "samples/step_000004.txt", str(work / "dl"))).read_text()
        assert text.startswith("Every effort moves you")
        assert "loss_curve.png" in [a.path for a in client.list_artifacts(kid.info.run_id)]
        (dataset,) = [d.dataset for d in kid.inputs.dataset_inputs]  # the UI's Dataset column
        assert dataset.name == "the-verdict" and len(dataset.digest) == 24
        assert json.loads(dataset.profile)["train_tokens"] == 4630 and json.loads(dataset.profile)["val_tokens"] == 515


def test_ray_checkpoints_load_into_gptcore_and_sample(studies):
    from gptcore.checkpoint import load_model
    from gptcore.sampling import generate_text

    work, _ = studies
    _, _, kids = sweep_runs(work, "stride_sweep")
    for kid in kids.values():
        best = Path(kid.data.tags["best_checkpoint"])
        assert best.is_dir() and str(best).startswith(str(work / "ray_results"))
        model, ckpt = load_model(best)
        assert ckpt.state.step == 4 and ckpt.config.model.d_model == 32
        assert generate_text(model, "Every effort moves you", 5)[0].startswith("Every effort moves you")
    proc = cli(["sample", kids["000_stride=256"].data.tags["best_checkpoint"], "--max-new-tokens", "5"], work)
    assert proc.stdout.startswith("Every effort moves you")


def test_report_verb_reads_mlflow(studies):
    work, _ = studies
    cli(["report", str(REPO / "experiments" / "stride_sweep.py"), "--out", "report"], work)
    assert (work / "report" / "results.md").read_text().count("| 000_stride=256 |") == 1
    assert (work / "report" / "train_vs_val.png").stat().st_size > 1000


def test_export_verb_writes_a_transformers_folder(studies):
    import torch
    from transformers import GPT2LMHeadModel

    from gptcore.checkpoint import load_model

    work, _ = studies
    _, _, kids = sweep_runs(work, "stride_sweep")
    checkpoint = kids["000_stride=256"].data.tags["best_checkpoint"]
    cli(["export", checkpoint, "hf_model"], work)
    hf = GPT2LMHeadModel.from_pretrained(work / "hf_model").eval()
    model, _ = load_model(checkpoint)
    tokens = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, model(tokens), atol=1e-5)


# --------------------------------------------------------------------------- the MLflow UI, as a user sees it


@contextlib.contextmanager
def mlflow_ui(work: Path):
    port = free_port()
    log = (work / "ui.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "ui", "--port", str(port)],
        cwd=work,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        import urllib.request

        while True:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            assert proc.poll() is None and time.monotonic() < deadline, (work / "ui.log").read_text()[-3000:]
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", proc, port
    finally:
        stop(proc)
        log.close()


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Chromium is not installed: `make test` installs Debian's chromium (or: apt install chromium)")
    return path


def test_mlflow_ui_shows_the_sweep_in_headless_chromium(studies):
    from playwright.sync_api import expect, sync_playwright

    work, _ = studies
    _, parent, kids = sweep_runs(work, "stride_sweep")
    child = kids["000_stride=256"]
    experiment_id = parent.info.experiment_id
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with mlflow_ui(work) as (url, ui, port), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        # The experiment's runs table ("Model training" view): the sweep's parent run, expanded to its trials.
        page.goto(f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
        row = page.get_by_role("row").filter(has_text=parent.info.run_name)
        expect(row).to_be_visible(timeout=180_000)
        row.locator('[col-id="attributes.`Run Name`"]').locator("button, [role=button]").first.click()
        for name in kids:
            expect(page.get_by_text(name, exact=True).first).to_be_visible(timeout=120_000)
        expect(page.get_by_text("the-verdict").first).to_be_visible(timeout=120_000)  # the Dataset column
        expect(page.get_by_text("stride_sweep.py").first).to_be_visible(timeout=120_000)  # the Source column
        page.screenshot(path=str(ARTIFACTS / "mlflow_ui_sweep.png"), full_page=True)
        # A trial's page: its parent, params and metrics.
        page.goto(f"{url}/#/experiments/{experiment_id}/runs/{child.info.run_id}?workflowType=machine_learning")
        expect(page.get_by_text(parent.info.run_name).first).to_be_visible(timeout=180_000)
        expect(page.get_by_text("val_loss").first).to_be_visible(timeout=120_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow_ui_run.png"), full_page=True)
        # The best model, registered by the sweep: its page in the Model Registry, version 1 listed.
        page.goto(f"{url}/#/models/stride_sweep")
        expect(page.get_by_text("Version 1").first).to_be_visible(timeout=180_000)
        page.screenshot(path=str(ARTIFACTS / "mlflow_ui_model.png"), full_page=True)
        browser.close()
        assert_sigterm_stops_the_server(ui, port)
    assert (ARTIFACTS / "mlflow_ui_run.png").stat().st_size > 10_000


def assert_sigterm_stops_the_server(ui: subprocess.Popen, port: int) -> None:
    """SIGTERM to ``orchestrator ui`` stops its MLflow server and every process of the server's group."""
    from tests.servers import psutil
    from tests.test_ui import group, port_free

    server = psutil.Process(ui.pid).children()[0]
    assert os.getpgid(server.pid) == server.pid != os.getpgid(ui.pid)  # the server leads its own group
    assert len(group(server.pid)) >= 2  # the server and its uvicorn worker (and MLflow's job runners)
    ui.send_signal(signal.SIGTERM)
    assert ui.wait(timeout=60) == 0
    deadline = time.monotonic() + 60
    while (group(server.pid) or not port_free(port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert group(server.pid) == [], [p.cmdline() for p in group(server.pid)]
    assert port_free(port)
