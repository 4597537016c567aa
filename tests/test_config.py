import math

import pytest
import torch

from gptcore.config import PRESETS, ConfigError, GPTConfig, JobConfig, model_config, valid_keys
from gptcore.model import GPT

# OpenAI's GPT-2 sizes as Hugging Face counts them (tied head); tiny and micro by GPT-2's formula at their widths,
# V*D + C*D + L*(12*D*D + 13*D) + 2*D. A preset missing here fails the test below until its size is written down.
PRESET_PARAMS = {
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
    "tiny": 3_320_640,
    "micro": 1_622_016,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_a_model_of_its_size(name):
    with torch.device("meta"):  # shapes only: gpt2-xl would need 6 GB of real weights
        model = GPT(model_config(name))
    assert model.num_params() == PRESET_PARAMS[name]


def test_unknown_key_suggests_the_field_it_misspells():
    with pytest.raises(
        ConfigError, match=r"^train\.batchsize: unknown config key \(did you mean train\.batch_size\?\);"
    ):
        JobConfig.from_dict({"train": {"batchsize": 4}})
    with pytest.raises(ConfigError, match=r"^model\.n_head: unknown config key \(did you mean model\.n_heads\?\);"):
        JobConfig.from_dict({"model": {"preset": "tiny", "n_head": 4}})
    with pytest.raises(ConfigError, match=r"^train\.warp_speed: unknown config key; valid keys in 'train': "):
        JobConfig.from_dict({"train.warp_speed": 9})


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"d_model": 100, "n_heads": 12}, "model.d_model"),
        ({"pos_emb": "alibi"}, "model.pos_emb"),
        ({"n_layers": 0}, "model.n_layers"),
        ({"context_length": -1}, "model.context_length"),
        ({"vocab_size": 0}, "model.vocab_size"),
        ({"dropout": 1.5}, "model.dropout"),
        ({"n_heads": 2.5}, "model.n_heads"),
    ],
)
def test_invalid_model_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        model_config("tiny", **overrides)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"data.stride": 0}, "data.stride"),
        ({"data.stride": -5}, "data.stride"),
        ({"train.lr": 0.0}, "train.lr"),
        ({"train.lr": math.nan}, "train.lr"),
        ({"train.lr": -1e-3}, "train.lr"),
        ({"train.batch_size": 0}, "train.batch_size"),
        ({"train.lr": "fast"}, "train.lr"),
        ({"train.precision": "fp8"}, "train.precision"),
        ({"data.val_fraction": 1.0}, "data.val_fraction"),
        ({"train.learning_rate": 1e-3}, "train.learning_rate"),
        ({"optim.lr": 1e-3}, "optim"),
        ({"model.preset": "gpt5"}, "model.preset"),
    ],
)
def test_invalid_job_values_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        JobConfig.from_dict(raw)


def test_dotted_and_nested_keys_round_trip():
    job = JobConfig.from_dict({"model": {"preset": "tiny", "pos_emb": "rope"}, "train.lr": 1e-3, "data.stride": 16})
    assert job.model.pos_emb == "rope" and job.model.d_model == 64
    assert job.train.lr == 1e-3 and job.stride == 16
    again = JobConfig.from_dict(job.to_dict())
    assert again == job
    assert set(job.flat()) <= set(valid_keys())


def test_stride_defaults_to_context_length():
    job = JobConfig.from_dict({"model": {"preset": "tiny"}})
    assert job.stride == job.model.context_length == 64


def test_padded_vocab():
    assert GPTConfig(pad_vocab_multiple=64).padded_vocab_size == 50304


def test_a_global_batch_sets_the_accumulation_for_each_worker_count():
    """train.global_batch_size: windows per optimizer step on any number of workers; the accumulation follows, and a
    count whose micro-batches do not divide it is refused, naming the counts that do."""
    t = JobConfig.from_dict({"train": {"batch_size": 2, "global_batch_size": 12}}).train
    assert [t.accumulation_steps(w) for w in (1, 2, 3, 6)] == [6, 3, 2, 1]
    assert {t.windows_per_step(w) for w in (1, 2, 3, 6)} == {12}
    with pytest.raises(
        ConfigError,
        match=r"12 is not a multiple of train.batch_size=2 x 4 worker\(s\) = 8; worker "
        r"counts that divide it: 1, 2, 3, 6",
    ):
        t.accumulation_steps(4)
    assert JobConfig.from_dict({"train": {"grad_accum_steps": 3}}).train.accumulation_steps(4) == 3
    with pytest.raises(ConfigError, match=r"train\.global_batch_size: sets the gradient accumulation itself"):
        JobConfig.from_dict({"train": {"batch_size": 2, "global_batch_size": 8, "grad_accum_steps": 2}})
    with pytest.raises(ConfigError, match=r"9 is not a multiple of train\.batch_size=2 x 1 worker"):
        JobConfig.from_dict({"train": {"batch_size": 2, "global_batch_size": 9}})
