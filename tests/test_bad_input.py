"""Bad input (issue #7): one ``error: ...`` line naming the problem and the fix, a non-zero exit, nothing half-written.

Most cases drive ``orchestrator.cli.main`` in-process (no Ray is started: every check runs before it); a few run
``python -m orchestrator`` for real to check the exit code and stderr of the process itself.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptcore.checkpoint import check_fits, load_checkpoint, load_model_weights
from gptcore.checkpoint_format import MODEL_FILE, CheckpointError, TrainState
from gptcore.checkpoint_whole import save_checkpoint
from gptcore.config import JobConfig
from gptcore.model import GPT
from orchestrator.cli import main
from orchestrator.cluster import check_cpus, check_local_gpu, resolve_gpu
from orchestrator.experiment import expand_trials, load_experiment
from orchestrator.plan import resolve_init
from orchestrator.sweep_error import SweepError
from orchestrator.trial_spec import TrialSpec

REPO = Path(__file__).resolve().parents[1]

EXPERIMENT = """
from orchestrator import Experiment, grid
EXPERIMENT = Experiment(
    name="bad_input", corpus="the-verdict", model="micro", train={"max_steps": 2, "batch_size": 2},
    grid={"train.lr": grid(1e-3)},
)
"""
WRITTEN = ("ray_results", "mlruns.db", "mlartifacts")  # what a sweep writes in its working directory


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory holding a valid experiment file, exp.py (micro model on the-verdict)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.py").write_text(EXPERIMENT)
    return tmp_path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real gptcore checkpoint of the micro model (untrained: only its format and shapes matter)."""
    config = JobConfig.from_dict({"model": {"preset": "micro"}, "data": {"corpus": "the-verdict"}})
    torch.manual_seed(0)
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "checkpoint_000000",
        model=GPT(config.model),
        config=config,
        state=TrainState(),
    )


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def refused(capsys, work: Path, argv: list[str], *needles: str) -> str:
    """Run the CLI in-process; it must exit 2 with one error line holding ``needles`` and write nothing."""
    rc = main(argv)
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert rc == 2, captured
    for needle in needles:
        assert needle in line, line
    for name in WRITTEN:
        assert not (work / name).exists(), f"{name} written by a refused run"
    return line


def corpus(work: Path, name: str, data: bytes) -> str:
    path = work / name
    path.write_bytes(data)
    return f"data.corpus={path}"


# --------------------------------------------------------------------------- corpora


def test_missing_corpus_file(work, capsys):
    line = refused(capsys, work, ["run", "exp.py", "--set", f"data.corpus={work / 'nope.txt'}"], "not found")
    assert "check the path" in line and "nope.txt" in line


def test_unknown_corpus_name(work, capsys):
    refused(
        capsys,
        work,
        ["run", "exp.py", "--set", "data.corpus=wikitext"],
        "corpus 'wikitext' not found",
        "named corpus (the-verdict, tinyshakespeare)",
    )


def test_empty_corpus(work, capsys):
    refused(capsys, work, ["run", "exp.py", "--set", corpus(work, "empty.txt", b"  \n")], "empty.txt", "is empty")


@pytest.mark.parametrize(
    ("text", "split"), [(b"hello world", "train split has 2 tokens"), (b"one two three " * 30, "validation split")]
)
def test_corpus_shorter_than_a_window(work, capsys, text, split):
    line = refused(capsys, work, ["run", "exp.py", "--set", corpus(work, "short.txt", text)], split)
    assert "fewer than context_length + 1 = 33" in line and "use a smaller model.context_length" in line


def test_non_utf8_corpus(work, capsys):
    data = "caf\u00e9 au lait, ".encode("latin-1") * 20
    refused(capsys, work, ["run", "exp.py", "--set", corpus(work, "latin1.txt", data)], "not valid UTF-8", "iconv")


# --------------------------------------------------------------------------- config values and --set


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("model.d_model=33", "model.d_model: d_model=33 must be divisible by n_heads=2; set model.d_model to a multi"),
        ("model.pos_emb=alibi", "unknown positional embedding 'alibi'; choose one of learned, sinusoidal, rope"),
        ("model.n_layers=-1", "model.n_layers: must be a positive integer, got -1"),
        ("model.context_length=0", "model.context_length: must be a positive integer, got 0"),
        ("data.stride=0", "data.stride: must be a positive integer, got 0"),
        ("data.stride=-8", "data.stride: must be a positive integer, got -8"),
        ("train.lr=0", "train.lr: must be a finite number > 0, got 0.0"),
        ("train.lr=-1e-3", "train.lr: must be a finite number > 0"),
        ("train.lr=NaN", "train.lr: must be a finite number > 0, got nan"),
        ("train.lr=nan", "train.lr: must be a finite number > 0"),
        ("train.batch_size=0", "train.batch_size: must be a positive integer, got 0"),
        ("train.batch_size=abc", "train.batch_size: must be a positive integer, got 'abc'"),
        ("train.batch_size=1.5", "train.batch_size: must be a positive integer, got 1.5"),
        ("model.dropout=abc", "model.dropout: must be a finite number in [0, 1], got 'abc'"),
        ("model.qkv_bias=maybe", "model.qkv_bias: must be true or false"),
        ("train.learning_rate=1e-3", "--set train.learning_rate: unknown config key; valid keys: model.preset"),
        ("train.batchsize=4", "unknown config key; did you mean train.batch_size?"),
        ("train.lr", "--set 'train.lr': expected KEY=VALUE, e.g. --set train.lr=1e-3"),
    ],
)
def test_bad_config_value(work, capsys, item, message):
    refused(capsys, work, ["run", "exp.py", "--set", item], message)


# --------------------------------------------------------------------------- experiment files


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "experiment file missing.py not found; pass a path such as experiments/stride_sweep.py"),
        ("EXPERIMENT = (", "syntax error: '(' was never closed; fix the file and run again"),
        ("from orchestrator import Experiment\nEXPERIMENT = Experiment(name='x')", "has no grid; add grid={"),
        ("import nothing_here", "raised ModuleNotFoundError: No module named 'nothing_here'; fix the file"),
        ("x = 1", "does not define EXPERIMENT = Experiment(...); add it"),
    ],
)
def test_bad_experiment_file(work, capsys, text, message):
    name = "missing.py" if text is None else "broken.py"
    if text is not None:
        (work / name).write_text(text)
    refused(capsys, work, ["run", name], message)


# --------------------------------------------------------------------------- checkpoints


def test_truncated_checkpoint_is_refused_and_left_alone(checkpoint, tmp_path, capsys):
    ckpt = tmp_path / "checkpoint_truncated"
    ckpt.mkdir()
    for file in checkpoint.iterdir():
        data = file.read_bytes()
        (ckpt / file.name).write_bytes(data[: len(data) // 2] if file.name == MODEL_FILE else data)
    before = snapshot(ckpt)
    refused(capsys, tmp_path, ["sample", str(ckpt)], f"{ckpt / MODEL_FILE} is truncated", "pick an earlier checkpoint")
    refused(capsys, tmp_path, ["export", str(ckpt), str(tmp_path / "hf")], "is truncated")
    assert not (tmp_path / "hf").exists() and snapshot(ckpt) == before


def test_missing_checkpoint(tmp_path, capsys):
    refused(capsys, tmp_path, ["sample", str(tmp_path / "nope")], "does not exist; pass a checkpoint folder")


def test_checkpoint_of_another_architecture(work, checkpoint, capsys):
    before = snapshot(checkpoint)
    argv = ["run", "exp.py", "--set", f"train.init_from={checkpoint}", "--set", "model.d_model=64"]
    line = refused(capsys, work, argv, "is a checkpoint of another architecture", "model.d_model: checkpoint 32 vs")
    assert "set these model.* values to the checkpoint's" in line and snapshot(checkpoint) == before
    # The public gptcore entry points say the same; a checkpoint of the same architecture passes.
    other = JobConfig.from_dict({"model": {"preset": "micro", "n_layers": 2}}).model
    with pytest.raises(CheckpointError, match=r"model\.n_layers: checkpoint 1 vs config 2"):
        check_fits(checkpoint, other)
    with pytest.raises(CheckpointError, match="different architecture"):
        load_model_weights(GPT(other), load_checkpoint(checkpoint).model_state)
    check_fits(checkpoint, JobConfig.from_dict({"model": {"preset": "micro", "dropout": 0.0}}).model)
    resolve_init(expand_trials(load_experiment(work / "exp.py"), {"train.init_from": str(checkpoint)}))


def test_hugging_face_folder_of_another_architecture(work, capsys):
    """A local HF GPT-2 folder is checked from its config.json before Ray starts; a fitting one passes."""
    hf = work / "hf-micro"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"n_embd": 32, "n_head": 2, "n_layer": 1, "n_positions": 32}))
    argv = ["run", "exp.py", "--set", f"train.init_from={hf}", "--set", "model.n_layers=3"]
    refused(capsys, work, argv, "does not fit the checkpoint", "model.n_layers is 3, the checkpoint needs 1")
    resolve_init(expand_trials(load_experiment(work / "exp.py"), {"train.init_from": str(hf)}))


@pytest.mark.parametrize("kind", ["checkpoint", "hugging-face-folder"])
def test_a_relative_init_from_reaches_the_workers_absolute(work, checkpoint, monkeypatch, kind):
    """Workers run in other directories: a relative local init_from is handed to them absolute (a relative
    ``runs/hf`` there would be taken for a Hub model id)."""
    if kind == "checkpoint":
        monkeypatch.chdir(checkpoint.parent)
        given, expected = checkpoint.name, checkpoint
    else:
        (work / "runs" / "hf").mkdir(parents=True)
        config = {"n_embd": 32, "n_head": 2, "n_layer": 1, "n_positions": 32}
        (work / "runs" / "hf" / "config.json").write_text(json.dumps(config))
        given, expected = "runs/hf", work / "runs" / "hf"
    trials = resolve_init(expand_trials(load_experiment(work / "exp.py"), {"train.init_from": given}))
    assert trials and all(trial.job.train.init_from == str(expected) for trial in trials)
    handed = TrialSpec(trials[0].name, trials[0].params, trials[0].job, run_id="0").to_dict()
    assert TrialSpec.from_dict(handed).job.train.init_from == str(expected)  # as a worker reads it


def test_init_from_truncated_or_missing_checkpoint(work, checkpoint, capsys):
    refused(capsys, work, ["run", "exp.py", "--set", f"train.init_from={work / 'gone'}"], "does not exist")
    bad = work / "ckpt"
    bad.mkdir()
    for file in checkpoint.iterdir():
        (bad / file.name).write_bytes(file.read_bytes()[:100] if file.name == MODEL_FILE else file.read_bytes())
    refused(capsys, work, ["run", "exp.py", "--set", f"train.init_from={bad}"], "train.init_from:", "is truncated")


# --------------------------------------------------------------------------- Ray: refused before it starts


def cli(work: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], cwd=work, capture_output=True, text=True, timeout=timeout
    )


def test_unreachable_address_fails_fast(work):
    proc = cli(work, "run", "exp.py", "--address", "127.0.0.1:1")
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert "Ray cluster at 127.0.0.1:1 is unreachable" in line and "leave --address out" in line
    assert not any((work / name).exists() for name in WRITTEN)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_use_gpu_without_a_gpu_fails_fast(work, capsys):
    proc = cli(work, "run", "exp.py", "--use-gpu", "yes")
    line = one_error_line(proc.stderr)
    assert proc.returncode == 2 and "use_gpu is set but this machine has no GPU" in line
    assert "--use-gpu no or auto" in line and not any((work / name).exists() for name in WRITTEN)


def test_use_gpu_on_a_cluster_without_gpus(monkeypatch):
    """Joined clusters are asked once Ray is up: no GPU is an error, unless --wait-for-resources (autoscaling)."""
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    with pytest.raises(SweepError, match="--wait-for-resources if GPU nodes autoscale"):
        resolve_gpu(True)
    assert resolve_gpu(True, wait_for_resources=True) is True and resolve_gpu("auto") is False
    check_local_gpu(True, "10.0.0.5:6379")  # a cluster's GPUs are not this machine's
    check_local_gpu(True, None, wait_for_resources=True)


def test_a_trial_that_does_not_fit_this_machines_memory(work, capsys):
    """A local run whose trial needs more memory at its peak than this machine has (its estimate of live tensors:
    gptcore.memory) is refused before Ray starts, naming the trial, both figures and what to change."""
    wide = ["--set", "model.d_model=1000000", "--set", "model.n_heads=1"]  # 10^11 parameters: 1.5 TiB to train
    line = refused(capsys, work, ["run", "exp.py", *wide], "trial 000_lr=0.001 needs ")
    assert "GiB of memory at its peak" in line and "but this machine has " in line
    assert "lower train.batch_size" in line and "train.activation_checkpointing=true" in line


def test_a_global_batch_the_workers_cannot_split(work, capsys):
    argv = ["run", "exp.py", "--set", "train.global_batch_size=6", "--workers", "4", "--dry-run"]
    refused(capsys, work, argv, "trial 000_lr=0.001: train.global_batch_size: 6 is not a multiple of", "1, 3")


def test_worker_ranges_refused_before_ray(work, capsys):
    """An elastic range upside down or from 0 workers, elastic without a global batch, a global batch or an FSDP
    embedding some count of the range cannot split: one error each, exit 2, before Ray starts."""
    refused(capsys, work, ["run", "exp.py", "--workers", "3:2"], "workers=(3, 2): the minimum is above", "(2, 3)")
    refused(capsys, work, ["run", "exp.py", "--workers", "0:2"], "workers=(0, 2): a trial needs at least one worker")
    (work / "elastic.py").write_text(EXPERIMENT.replace("name=", "workers=(1, 2), name=", 1))
    refused(capsys, work, ["run", "elastic.py"], "workers=(1, 2) is elastic", "set train.global_batch_size", "e.g. 4")
    gbs = ["--set", "train.global_batch_size=4"]
    refused(capsys, work, ["run", "exp.py", "--workers", "1:3", *gbs], "2 x 3 worker(s) = 6", "workers=(1, 3)")
    fsdp = ["--set", "train.global_batch_size=40", "--set", "train.parallel=fsdp"]
    fsdp += ["--set", "model.pad_vocab_multiple=64"]
    refused(capsys, work, ["run", "exp.py", "--workers", "4:5", *fsdp], "50304-row", "across 5 workers", "(4, 5)")


def test_a_batch_larger_than_the_train_split(work, capsys):
    """A batch the train split cannot fill is refused before Ray starts (the loop would refuse it on the worker), and
    the dry run says the same."""
    argv = ["run", "exp.py", "--set", "train.batch_size=100000"]
    refused(capsys, work, argv, "trial 000_lr=0.001:", "fewer than train.batch_size=100000", "lower train.batch_size")
    refused(capsys, work, [*argv, "--dry-run"], "trial 000_lr=0.001:", "fewer than train.batch_size=100000")


def test_more_cpus_per_worker_than_any_node_has(monkeypatch):
    """A worker that no node can hold would wait forever: refused with the fix, unless --wait-for-resources."""
    import ray

    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 64.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    with pytest.raises(SweepError, match="asks for 4 CPUs but the largest node of the Ray cluster has 2; pass "):
        check_cpus(4)
    check_cpus(2)
    check_cpus(4, wait_for_resources=True)


# --------------------------------------------------------------------------- security


def test_ui_refuses_a_public_host_without_expose(tmp_path, capsys):
    line = refused(capsys, tmp_path, ["ui", "--host", "0.0.0.0"], "refusing to bind the MLflow UI to 0.0.0.0")
    assert "Pass --expose" in line


def test_no_weight_file_is_unpickled():
    """Every torch.load passes weights_only=True; nothing calls pickle or np.load(allow_pickle=True)."""
    loads = 0
    for path in sorted([*REPO.glob("gptcore/*.py"), *REPO.glob("orchestrator/*.py"), *REPO.glob("benchmarks/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names), path
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            kwargs = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if node.func.attr == "load" and ast.unparse(node.func.value) == "torch":
                loads += 1
                flag = kwargs.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, (
                    f"{where}: torch.load without weights_only"
                )
            allow = kwargs.get("allow_pickle")
            assert not (isinstance(allow, ast.Constant) and allow.value), f"{where}: allow_pickle=True"
    assert loads >= 1  # the pytorch_model.bin reader in gptcore/hf_import.py
