"""Where pretrained weights live: a local folder, or a Hugging Face Hub model id downloaded to the local cache.

Downloading needs huggingface_hub (extra ``hub``) and internet access or a filled cache; it is imported only
when a model id is given, so local folders work without it.
"""

from __future__ import annotations

from pathlib import Path

from gptcore.checkpoint import init_source_kind
from gptcore.checkpoint_format import CheckpointError
from gptcore.gpt2_layout import HF_CONFIG, weight_files

SAFETENSORS_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
BIN_PATTERNS = ["config.json", "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]


def pretrained_folder(source: str, *, weights: bool) -> Path:
    """A local folder for ``source``: the folder itself, or a Hugging Face Hub download.

    ``weights=False`` downloads only ``config.json``.
    """
    path = Path(source).expanduser()
    if init_source_kind(source) == "hub":
        return _download(source, weights=weights)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{source} is a file; pass the folder that holds the checkpoint files")
    raise CheckpointError(f"{source} does not exist; pass an existing folder or a Hugging Face model id")


def _download(model_id: str, *, weights: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{model_id!r} is not a local folder, and downloading it from the Hugging Face Hub needs "
            "huggingface_hub: pip install 'gpt-orchestrator[hub]'; offline, pass a local folder with "
            "config.json and model.safetensors instead (e.g. --set train.init_from=/path/to/gpt2)"
        ) from None
    try:
        folder = Path(snapshot_download(model_id, allow_patterns=SAFETENSORS_PATTERNS if weights else [HF_CONFIG]))
        if weights and not weight_files(folder):
            folder = Path(snapshot_download(model_id, allow_patterns=BIN_PATTERNS))
    except Exception as exc:  # offline, unknown or gated id: huggingface_hub raises many types
        raise CheckpointError(
            f"could not download {model_id!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}); "
            "this needs internet access (or the model in the local HF cache). Offline, pass a local folder "
            "with config.json and model.safetensors instead (e.g. --set train.init_from=/path/to/gpt2)"
        ) from None
    if weights and not weight_files(folder):
        raise CheckpointError(f"{model_id!r} on the Hugging Face Hub has no model.safetensors or pytorch_model.bin")
    return folder
