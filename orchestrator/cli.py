"""``python -m orchestrator`` — run sweeps, browse them in MLflow, sample from checkpoints, report results."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from gptcore.config import PRECISIONS

# Bad input: `main` prints the message of these as one line and exits 2 (module -> class).
USER_ERRORS = {
    "gptcore.checkpoint_format": "CheckpointError",
    "gptcore.config": "ConfigError",
    "gptcore.shards": "DataError",
    "orchestrator.experiment": "ExperimentError",
    "orchestrator.results": "ReportError",
    "orchestrator.scaling_law": "ScalingFitError",
    "orchestrator.storage": "StorageError",
    "orchestrator.sweep_error": "SweepError",
    "orchestrator.tracking": "TrackingError",
}


def _user_errors() -> tuple[type[Exception], ...]:
    """The bad-input errors of the modules loaded: one can only be raised once its module is (and a run that stops at
    bad input does not import torch to catch an error torch's modules never raised)."""
    return tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS.items() if module in sys.modules)


# --------------------------------------------------------------------------- run


def _workers(text: str) -> int | tuple[int, int]:
    """``--workers``: ``N`` or ``MIN:MAX`` (the range itself is checked with the experiment's, `worker_range`)."""
    try:
        counts = tuple(int(part) for part in text.split(":"))
    except ValueError:
        counts = ()
    if len(counts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r} is no worker count: give N (e.g. 2) or MIN:MAX (e.g. 2:4)")
    return counts[0] if len(counts) == 1 else counts


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.dry_run import describe_plan
    from orchestrator.experiment import load_experiment, parse_overrides
    from orchestrator.plan import SweepOptions, make_plan
    from orchestrator.resume import refuse_changes_on_resume
    from orchestrator.sweep import exit_code, run_sweep

    if args.resume:  # before anything is read or started: the sweep is the one its sweep.json describes
        refuse_changes_on_resume(vars(args))
    experiment = load_experiment(args.experiment)
    use_gpu = {"auto": "auto", "yes": True, "no": False, None: None}[args.use_gpu]
    options = SweepOptions(
        overrides=parse_overrides(args.overrides or [], experiment.kind),
        address=args.address,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        max_concurrent=args.max_concurrent,
        resume=args.resume,
        workers=args.workers,
        use_gpu=use_gpu,
        cpus_per_worker=args.cpus_per_worker,
        experiment_file=str(Path(args.experiment).absolute()),
        peak_flops=args.peak_flops,
        mfu=args.mfu,
        prices=args.prices,
        calibrate=args.calibrate,
    )
    plan = None if args.resume else make_plan(experiment, options)  # every trial validated before anything starts
    if args.dry_run:
        print(describe_plan(plan or make_plan(experiment, options), options))
        return 0
    outcome = run_sweep(experiment, options, plan=plan, wait_for_resources=args.wait_for_resources)
    from orchestrator.report import write_report  # matplotlib: not for a run that stops at bad input

    report = write_report(outcome.tracking_uri, outcome.experiment, outcome.sweep_id)
    print(f"\nResults of sweep {outcome.sweep_id} ({report['ranking']}):\n{report['table']}")
    print(f"\nMLflow: python -m orchestrator ui{_uri_flag(args.tracking_uri)}  (parent run {outcome.parent_run_id})")
    if not experiment.is_decode:
        _register_after_sweep(outcome.tracking_uri, outcome.experiment, outcome.sweep_id)
    if outcome.interrupted:
        print(f"\nThe sweep was interrupted; finish it with: python -m orchestrator run {args.experiment} --resume")
    return exit_code(outcome)


def _register_after_sweep(uri: str, experiment: str, sweep_id: str) -> None:
    """The sweep's best model into the Model Registry; a sweep without one (or a store without a registry) says so."""
    from orchestrator.registry import RegistryError, register_best

    try:
        print(_registered(register_best(uri, experiment, sweep_id)))
    except RegistryError as exc:
        print(f"\nnot registered: {' '.join(str(exc).split())}")
    except Exception as exc:  # the sweep itself is done: its exit status stays the sweep's
        print(
            f"\nnot registered ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); retry with: "
            f"python -m orchestrator register {experiment} --sweep {sweep_id}"
        )


def _registered(done: dict) -> str:
    best = done["best_version"]
    alias = "now points at it" if best == done["version"] else f"stays on version {best}"
    return (
        f"\nregistered {done['name']} version {done['version']} (trial {done['trial']} of sweep {done['sweep']}, "
        f"val_loss {done['val_loss']:.4f}); alias best {alias}: {done['model_uri']}"
    )


def _uri_flag(uri: str | None) -> str:
    return f" --tracking-uri {uri}" if uri else ""


# --------------------------------------------------------------------------- prepare


def cmd_prepare(args: argparse.Namespace) -> int:
    import ray

    from gptcore.config import DataConfig
    from gptcore.corpus import plan_corpus
    from orchestrator.cluster import connect_ray
    from orchestrator.prepare import needs_ray, prepare, read_dataset_manifest
    from orchestrator.storage import absolute_storage

    corpus = args.corpus[0] if len(args.corpus) == 1 else list(args.corpus)
    data = DataConfig(corpus=corpus, val_fraction=args.val_fraction, split=args.split, text_field=args.text_field)
    plan = plan_corpus(data)  # every input is checked before Ray starts
    storage = absolute_storage(args.storage, str(Path.cwd()))
    if needs_ray(plan):
        connect_ray(args.address, dashboard=False)
    try:
        location = prepare(plan, storage)
    finally:
        ray.shutdown()
    manifest = read_dataset_manifest(location)
    print(
        f"dataset {manifest.key} at {location}: {manifest.tokens('train'):,} train and {manifest.tokens('val'):,} "
        f"validation tokens in {len(manifest.shards)} shard(s); a run whose data.corpus is this corpus (same split "
        "settings) trains on it"
    )
    return 0


# --------------------------------------------------------------------------- ui


def cmd_ui(args: argparse.Namespace) -> int:
    from orchestrator.tracking import mlflow_server_env, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.expose:
        print(
            f"error: refusing to bind the MLflow UI to {args.host}: anyone on the network could read and change "
            "runs. Pass --expose to do it anyway, or keep 127.0.0.1 and use an SSH port-forward "
            "(ssh -L 5000:127.0.0.1:5000 HOST)",
            file=sys.stderr,
        )
        return 2
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", args.host]
    command += ["--port", str(args.port), "--workers", "1"]
    print(f"MLflow UI on http://{args.host}:{args.port} (store {uri}); Ctrl-C to stop", flush=True)
    previous = {sig: signal.signal(sig, _stop_signal) for sig in STOP_SIGNALS}
    server = None
    try:  # the server in its own process group: it and its uvicorn worker are stopped together, by us only
        server = subprocess.Popen(command, start_new_session=True, env=mlflow_server_env())
        return server.wait()
    except _Stopped:
        return 0
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C or SIGTERM does not cut the clean-up short
        try:
            if server is not None:
                stop_process_group(server)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Stopped(Exception):
    """SIGTERM or SIGINT reached ``ui``."""


def _stop_signal(signum: int, frame: object) -> None:
    raise _Stopped(signum)


def stop_process_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM to the process group ``proc`` leads, SIGKILL to what is left after ``timeout`` s; reaps ``proc``."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # no process of the group is left
            break
        deadline = time.monotonic() + wait
        while _group_alive(proc) and time.monotonic() < deadline:
            time.sleep(0.1)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1)


def _group_alive(proc: subprocess.Popen) -> bool:
    """Whether a process of ``proc``'s group is left (``proc`` itself reaped as soon as it exits)."""
    proc.poll()
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


# --------------------------------------------------------------------------- sample


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from gptcore.checkpoint import load_model
    from gptcore.runtime import autocast, resolve_device, resolve_precision
    from gptcore.sampling import generate_text
    from orchestrator.storage import local_copy

    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_model(local_copy(args.checkpoint, Path(tmp)), device=device)
    dtype = resolve_precision(args.precision, device, "sample")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    with autocast(device, dtype):
        texts = generate_text(
            model,
            [args.prompt] * args.num_samples,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=generator,
        )
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(text)
    return 0


# --------------------------------------------------------------------------- export


def cmd_export(args: argparse.Namespace) -> int:
    from gptcore.hf_export import export_hf
    from orchestrator.storage import local_copy

    with tempfile.TemporaryDirectory() as tmp:
        out = export_hf(local_copy(args.checkpoint, Path(tmp)), args.out, overwrite=args.overwrite)
    print(f"wrote a Hugging Face GPT-2 folder to {out}; load it with GPT2LMHeadModel.from_pretrained({str(out)!r})")
    return 0


# --------------------------------------------------------------------------- report


def _experiment_name(name_or_file: str) -> str:
    """An experiment's name, given as it is or as its experiment file."""
    if not name_or_file.endswith(".py"):
        return name_or_file
    from orchestrator.experiment import load_experiment

    return load_experiment(name_or_file).name


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.report import write_report
    from orchestrator.results import ReportError
    from orchestrator.tracking import resolve_tracking_uri

    if args.predict_flops is not None and not (math.isfinite(args.predict_flops) and args.predict_flops > 0):
        raise ReportError(f"--predict-flops {args.predict_flops} is not a positive FLOP count; pass e.g. 1e21")
    uri = resolve_tracking_uri(args.tracking_uri)
    report = write_report(uri, _experiment_name(args.experiment), args.sweep, args.out, args.predict_flops)
    print(f"Sweep {report['sweep']} ({report['ranking']}):\n{report['table']}")
    if args.out:
        written = ", ".join(["results.md", "results.csv", *(report["scaling"].files if report["scaling"] else [])])
        print(f"\nwritten to {Path(args.out).absolute()}: {written}, plots")
    return 0


# --------------------------------------------------------------------------- register


def cmd_register(args: argparse.Namespace) -> int:
    from orchestrator.registry import register_best
    from orchestrator.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    print(_registered(register_best(uri, _experiment_name(args.experiment), args.sweep)).strip())
    return 0


# --------------------------------------------------------------------------- scaling-fit


def cmd_scaling_fit(args: argparse.Namespace) -> int:
    from orchestrator.scaling_fit import scaling_fit  # scipy: only for this verb

    print(scaling_fit(args.results, as_json=args.json, predict_flops=args.predict_flops))
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__)
    verbs = parser.add_subparsers(
        dest="verb", required=True, metavar="{run,prepare,ui,sample,report,export,register,scaling-fit}"
    )
    _add_run(verbs)
    _add_prepare(verbs)
    _add_ui(verbs)
    _add_sample(verbs)
    _add_export(verbs)
    _add_report(verbs)
    _add_register(verbs)
    _add_scaling_fit(verbs)
    return parser


def _add_run(verbs: argparse._SubParsersAction) -> None:
    run = verbs.add_parser("run", help="run (or resume) the sweep an experiment file describes")
    run.add_argument("experiment", help="experiment file, e.g. experiments/stride_sweep.py")
    run.add_argument(
        "--set", action="append", dest="overrides", metavar="KEY=VALUE", help="override a config key (repeatable)"
    )
    run.add_argument("--dry-run", action="store_true", help="print the trials and their resources; start nothing")
    run.add_argument("--address", help="join a running Ray cluster (HOST:PORT or auto); default: start a local one")
    run.add_argument("--storage", help="Ray storage folder or URI (s3://...); default ./ray_results")
    run.add_argument("--tracking-uri", help="MLflow tracking URI; default: SQLite file ./mlruns.db")
    run.add_argument("--max-concurrent", type=int, help="at most this many trials at once")
    run.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="SWEEP_ID",
        help="continue an interrupted sweep (default: latest) as it was started: no --set, --workers, --use-gpu, "
        "--cpus-per-worker or --max-concurrent",
    )
    run.add_argument(
        "--workers",
        type=_workers,
        help="workers per trial (overrides the experiment): N, or MIN:MAX for an elastic trial (e.g. 2:4)",
    )
    run.add_argument("--use-gpu", choices=["auto", "yes", "no"], help="train on GPUs (default: the experiment's)")
    run.add_argument("--cpus-per-worker", type=float, help="CPUs per Ray Train worker (default 1)")
    run.add_argument(
        "--wait-for-resources", action="store_true", help="wait for GPUs to appear (autoscaling) instead of failing"
    )
    _add_estimate_options(run)
    run.set_defaults(func=cmd_run)


def _add_estimate_options(run: argparse.ArgumentParser) -> None:
    """What the dry run's time and cost estimates take (`orchestrator.estimate`)."""
    run.add_argument(
        "--peak-flops", type=_positive, metavar="F", help="dry run: peak FLOP/s per device (default: a GPU table)"
    )
    run.add_argument("--mfu", type=_fraction, help="dry run: the MFU to assume (default: measured in MLflow, else 0.4)")
    run.add_argument("--prices", metavar="FILE", help="dry run: USD per node-hour by node type (default ./prices.yaml)")
    run.add_argument(
        "--calibrate", action="store_true", help="dry run: time a few training steps of each model on this CPU"
    )


def _positive(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number (e.g. 312e12)")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a fraction in (0, 1] (e.g. 0.35)")
    return value


def _add_prepare(verbs: argparse._SubParsersAction) -> None:
    prepare = verbs.add_parser("prepare", help="tokenize a corpus once, on the Ray cluster, into token shards")
    prepare.add_argument("corpus", nargs="+", help="named corpus, file, folder, glob, or several of them")
    prepare.add_argument("--storage", help="where datasets live: folder or URI (s3://...); default ./ray_results")
    prepare.add_argument("--address", help="join a running Ray cluster (HOST:PORT or auto); default: a local Ray")
    prepare.add_argument("--val-fraction", type=float, default=0.1, help="as data.val_fraction (default 0.1)")
    prepare.add_argument("--split", default="auto", choices=["auto", "tokens", "documents"], help="as data.split")
    prepare.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text (data.text_field)")
    prepare.set_defaults(func=cmd_prepare)


def _add_ui(verbs: argparse._SubParsersAction) -> None:
    ui = verbs.add_parser("ui", help="start the MLflow UI on the project's tracking store")
    ui.add_argument("--tracking-uri", help="default: SQLite file ./mlruns.db")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--expose", action="store_true", help="allow binding a non-loopback address")
    ui.set_defaults(func=cmd_ui)


def _add_sample(verbs: argparse._SubParsersAction) -> None:
    sample = verbs.add_parser("sample", help="generate text from a trial's checkpoint")
    sample.add_argument("checkpoint", help="checkpoint folder (or s3:// URI), e.g. ray_results/.../checkpoint_...")
    sample.add_argument("--prompt", default="Every effort moves you")
    sample.add_argument("--max-new-tokens", type=int, default=50)
    sample.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    sample.add_argument("--top-k", type=int)
    sample.add_argument("--top-p", type=float)
    sample.add_argument("--num-samples", type=int, default=1)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="auto")
    sample.add_argument("--precision", default="auto", choices=PRECISIONS)
    sample.set_defaults(func=cmd_sample)


def _add_export(verbs: argparse._SubParsersAction) -> None:
    export = verbs.add_parser("export", help="save a checkpoint as a Hugging Face GPT-2 folder")
    export.add_argument("checkpoint", help="checkpoint folder (or s3:// URI)")
    export.add_argument("out", help="output folder (config.json, model.safetensors, tokenizer files)")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    export.set_defaults(func=cmd_export)


def _add_report(verbs: argparse._SubParsersAction) -> None:
    report = verbs.add_parser("report", help="results table and plots of a sweep, from MLflow")
    report.add_argument("experiment", help="experiment name or file")
    report.add_argument("--sweep", help="sweep id (default: the latest)")
    report.add_argument("--tracking-uri", help="default: SQLite file ./mlruns.db")
    report.add_argument("--out", help="also write the table and plots to this folder")
    report.add_argument(
        "--predict-flops", type=float, metavar="C", help="a scaling ladder: also the best N, D and loss for C FLOPs"
    )
    report.set_defaults(func=cmd_report)


def _add_register(verbs: argparse._SubParsersAction) -> None:
    register = verbs.add_parser("register", help="the best trial's model into the MLflow Model Registry (alias best)")
    register.add_argument("experiment", help="experiment name or file")
    register.add_argument("--sweep", help="sweep id (default: the latest)")
    register.add_argument("--tracking-uri", help="default: SQLite file ./mlruns.db")
    register.set_defaults(func=cmd_register)


def _add_scaling_fit(verbs: argparse._SubParsersAction) -> None:
    fit = verbs.add_parser("scaling-fit", help="fit a scaling law L(N, D) to runs (Hoffmann et al. 2022)")
    fit.add_argument("results", help="CSV with columns params,tokens,loss (and optionally flops), one run a row")
    fit.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    fit.add_argument("--predict-flops", type=float, metavar="C", help="also the best N, D and loss for C FLOPs")
    fit.set_defaults(func=cmd_scaling_fit)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        return args.func(args)
    except _user_errors() as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)  # one line, whatever the underlying library said
        return 2


if __name__ == "__main__":
    sys.exit(main())
