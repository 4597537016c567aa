"""The studies of ``experiments/``, run once per test session for tests/test_studies.py and test_mlflow_models.py.

Every experiment file runs end to end with a tiny ``--set`` override on one Ray cluster (``ray start --head``, token
auth, 2 CPUs) that each ``run`` joins with ``--address``, as a user's machine would; the MLflow store is the work
folder's. The decoding sweep samples from the best checkpoint of the stride sweep run before it
(``best:stride_sweep``). The warm start arm loads a randomly initialised Hugging Face GPT-2 of the ``micro`` shape
saved here (no downloads).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlflow import MlflowClient

from tests.servers import PATIENCE_S, Cli, RayCluster, ray_cluster

REPO = Path(__file__).resolve().parents[1]

TINY = ["model.preset=micro", "train.max_steps=4", "train.eval_every=2", "train.eval_iters=1"]
TINY += ["train.sample_every=4", "train.sample_max_new_tokens=4"]
FSDP_STEPS, FSDP_EVERY, FSDP_TRIAL = 30, 10, "000_lr=0.001"
# experiment -> extra --set items (a grid axis narrowed with a list keeps the sweep small)
STUDIES: dict[str, list[str]] = {
    "stride_sweep": [],
    "posemb_sweep": ["model.pos_emb=rope"],
    "freeze_embeddings": ["model.freeze_token_embeddings=[true]"],  # the frozen arm (the others train it all)
    # one trial at a time (ARGS), 24 steps: ASHA's first rung (step 20, an evaluation without a checkpoint)
    # compares each trial with those before it; the third runs after the one ASHA stops, and finishes
    "lr_sweep": ["train.lr=[5e-4,1e-4,1e-3]", "train.max_steps=24", "train.eval_every=4", "train.checkpoint_every=24"],
    "warmstart_vs_scratch": ["model.context_length=32", 'train.init_from=["{hf}"]'],  # the warm arm
    "full_grid": ["data.stride=32", "model.pos_emb=rope", "model.freeze_token_embeddings=true", "train.lr=5e-4"],
    # three sizes on one budget that buys them 2-4 steps (the fewest an iso-FLOP profile takes)
    "scaling_ladder": ["model.d_model=[32,48,64]", "train.flops_budget=[2.2e10]"],
    # the GPU study on the CPU: FSDP over gloo on 2 workers (ARGS), fp32, no compile, the-verdict, 30 steps;
    # its rank-1 worker is SIGKILLed at step 20 (`run_killing_rank_1`)
    "gpt2_xl_fsdp": [
        "data.corpus=the-verdict",
        "train.epochs=3",
        f"train.max_steps={FSDP_STEPS}",
        f"train.eval_every={FSDP_EVERY}",
        f"train.checkpoint_every={FSDP_EVERY}",
        f"train.sample_every={FSDP_STEPS}",
        "train.precision=fp32",
        "train.compile=false",
        "train.batch_size=2",
        "train.grad_accum_steps=1",
        "train.warmup_steps=0",
        "train.lr=1e-3",
    ],
}
ARGS: dict[str, list[str]] = {  # extra command-line arguments
    "lr_sweep": ["--max-concurrent", "1"],
    "gpt2_xl_fsdp": ["--workers", "2", "--use-gpu", "no"],
}
# the default store's file named by a relative URI, as a user types it: the workers, in other directories, must log
# into the driver's file (they once wrote a file of their own under /tmp/ray: the metrics were lost)
for _name in ("posemb_sweep", "freeze_embeddings"):
    ARGS[_name] = ["--tracking-uri", "sqlite:///mlruns.db"]
# a grid narrowed to one point (each trial costs a Ray Train start)
TRIALS = {"posemb_sweep": 1, "full_grid": 1, "gpt2_xl_fsdp": 1, "freeze_embeddings": 1, "warmstart_vs_scratch": 1}
TRIALS["lr_sweep"] = TRIALS["scaling_ladder"] = 3
STOPPED = {"lr_sweep": ["001_lr=0.0001"]}  # trials ASHA stops at its first rung
# the test cluster has 2 CPUs and no GPU
REFUSED_ON_THE_CLUSTER = {
    "cpus_beyond_the_largest_node": ("--cpus-per-worker", "4"),
    "gpu_on_a_cluster_without": ("--cpus-per-worker", "1", "--use-gpu", "yes"),
}
DECODE = ["decode.temperature=[0.7,1.5]", "decode.top_k=40", "decode.num_samples=2", "decode.max_new_tokens=8"]


def tiny_hf_gpt2(folder: Path) -> Path:
    """A randomly initialised Hugging Face GPT-2 of the micro preset's shape, saved as a local folder."""
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_head=2, n_layer=1, n_positions=32, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def run(
    work: Path, experiment: str, sets: list[str], env: dict[str, str], address: str, flags: tuple[str, ...] = ()
) -> tuple[int, str]:
    args = [sys.executable, "-m", "orchestrator", "run", str(REPO / "experiments" / f"{experiment}.py")]
    args += ["--address", address, *(flags or ("--cpus-per-worker", "1")), *ARGS.get(experiment, [])]
    args += [a for item in sets for a in ("--set", item)]
    proc = subprocess.run(
        args, cwd=work, env={**os.environ, **env}, capture_output=True, text=True, timeout=3 * PATIENCE_S
    )
    return proc.returncode, proc.stdout + proc.stderr


def run_killing_rank_1(work: Path, experiment: str, sets: list[str], cluster: RayCluster) -> tuple[int, str]:
    """``run`` in the background; the trial's rank-1 worker (the one that does not print) is SIGKILLed once rank 0
    has printed step 20, and the trial resumes from its sharded checkpoint."""
    args = ["run", str(REPO / "experiments" / f"{experiment}.py"), "--address", cluster.address]
    args += ["--cpus-per-worker", "1", *ARGS.get(experiment, []), *[a for item in sets for a in ("--set", item)]]
    cli = Cli(args, work, cluster.env)
    try:
        rank0 = int(cli.wait_for(rf"RayTrainWorker pid=(\d+)\)\S*\s+\[{FSDP_TRIAL}\] step 20/").group(1))
        (rank1,) = [p for p in cluster.processes("RayTrainWorker") if p.pid != rank0]
        time.sleep(0.3)
        rank1.send_signal(signal.SIGKILL)
        cli.wait_for(rf"\[{FSDP_TRIAL}\] .*resumed from step")
        return cli.finish(), cli.output()
    finally:
        if cli.proc.poll() is None:
            cli.kill_tree()


# Studies run in two lanes at once on the cluster (its 2 CPUs shared), each lane in its own work folder and MLflow
# store: most of a sweep's time is process starts, which overlap. The decoding sweep follows the stride sweep whose
# best checkpoint it samples; the FSDP study runs last and alone, on a cluster of its own (it takes both CPUs, and
# its rank 1 is found as the only other Ray Train worker).
SIDE_LANE = ("posemb_sweep", "freeze_embeddings", "warmstart_vs_scratch", "full_grid", "scaling_ladder")
MODELS = "full_grid"  # the one-trial sweep whose registered model tests/test_mlflow_models.py reads and serves


def lane_folder(work: Path, experiment: str) -> Path:
    return work / "side" if experiment in SIDE_LANE else work


def run_studies(work: Path) -> dict[str, tuple[int, str]]:
    """Run every study in ``work``; {name: (exit code, output)}.

    Both clusters start first, before the lanes load the machine: a node start in the middle of the other test
    process's sweeps is what a busy machine delays most. The FSDP study's cluster is a fresh one: on the shared one, a
    fresh-clone CI run once found its 2 CPUs still held after the lanes ("worker group startup timed out ... waiting
    for 2 workers"; the test cluster has no dashboard, whose state API Ray Train's placement-group cleaner reads).
    """
    (work / "side").mkdir()
    hf = tiny_hf_gpt2(work / "hf-gpt2-micro")
    sets = {name: TINY + [item.format(hf=hf) for item in extra] for name, extra in STUDIES.items()}
    with ray_cluster(work, workers=0, head_cpus=2) as cluster, ray_cluster(work, workers=0, head_cpus=2) as fsdp:

        def study(name: str, experiment: str | None = None, args: list[str] | None = None, **kw) -> tuple[int, str]:
            folder = lane_folder(work, name) if experiment is None else work / name
            return run(folder, experiment or name, args or sets[name], cluster.env, cluster.address, **kw)

        def main_lane() -> dict[str, tuple[int, str]]:
            done = {name: study(name) for name in ("stride_sweep", "lr_sweep")}
            done["decoding_sweep"] = study("decoding_sweep", args=DECODE)
            for name, flags in REFUSED_ON_THE_CLUSTER.items():  # bad input only the cluster can reveal
                (work / name).mkdir()
                done[name] = study(name, "stride_sweep", TINY, flags=flags)
            return done

        def side_lane() -> dict[str, tuple[int, str]]:
            return {name: study(name) for name in SIDE_LANE}

        with ThreadPoolExecutor(2) as pool:
            lanes = [pool.submit(main_lane), pool.submit(side_lane)]
            outcomes = {name: outcome for lane in lanes for name, outcome in lane.result().items()}
        outcomes["gpt2_xl_fsdp"] = run_killing_rank_1(work, "gpt2_xl_fsdp", sets["gpt2_xl_fsdp"], fsdp)
    return outcomes


def sweep_runs(work: Path, experiment: str):
    """The sweep's MLflow client, parent run and child runs by trial name (sweeps recorded by hand in the same
    experiment, as tests/test_mlflow_models.py does, are not its)."""
    client = MlflowClient(f"sqlite:///{lane_folder(work, experiment) / 'mlruns.db'}")
    exp = client.get_experiment_by_name(experiment)
    query = f"tags.`orchestrator.role` = 'sweep' and tags.`orchestrator.sweep_id` LIKE '{experiment}-%'"
    (parent,) = client.search_runs([exp.experiment_id], query)
    kids = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return client, parent, {k.data.tags["orchestrator.trial"]: k for k in kids}
