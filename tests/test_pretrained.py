"""GPT-2 weights in and out: HF folders (safetensors, .bin), model ids, OpenAI TF checkpoints, HF export.

No weights can be downloaded here, so every checkpoint is a small random GPT-2 written by the test.
"""

import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from gptcore.checkpoint_format import CheckpointError, TrainState
from gptcore.checkpoint_whole import save_checkpoint
from gptcore.config import model_config
from gptcore.data import build_datasets, make_loader
from gptcore.gpt2_layout import Pretrained
from gptcore.hf_export import export_hf
from gptcore.hooks import Hooks
from gptcore.hub import SAFETENSORS_PATTERNS
from gptcore.load_pretrained import config_from_pretrained, copy_pretrained, load_pretrained_into
from gptcore.model import GPT, lm_loss
from gptcore.openai_tf import fields_from_openai_hparams, openai_tf_to_gptcore
from gptcore.sampling import generate
from gptcore.tokenizer import encode
from gptcore.train import build_model, train

from .conftest import tiny_job

transformers = pytest.importorskip("transformers")

D, LAYERS, HEADS, CTX, VOCAB = 64, 2, 4, 64, 50257
LINEARS = ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")


def hf_model(tied: bool, seed: int = 0):
    """A random HF GPT-2 with non-trivial biases and LayerNorm parameters, in eval mode."""
    config = transformers.GPT2Config(
        n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=CTX, vocab_size=VOCAB, tie_word_embeddings=tied
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.1)
    return model.eval()


def gpt(**overrides) -> GPT:
    torch.manual_seed(1)
    return GPT(model_config("tiny", dropout=0.0, **overrides)).eval()


def tokens(n: int = 24, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def assert_same_logits(model: GPT, hf, n: int = 24) -> None:
    x = tokens(n)
    ours, theirs = model(x)[..., :VOCAB], hf(x).logits
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


@pytest.fixture(scope="module")
def hf_tied():
    return hf_model(tied=True)


@pytest.fixture(scope="module")
def hf_untied():
    return hf_model(tied=False, seed=5)


@pytest.fixture(scope="module")
def tied_dir(hf_tied, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-tied")
    hf_tied.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def untied_dir(hf_untied, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-untied")
    hf_untied.save_pretrained(path)
    assert "lm_head.weight" in load_file(path / "model.safetensors")
    return path


@pytest.fixture(scope="module")
def bin_dir(hf_tied, tmp_path_factory):
    """The layout of the original ``gpt2`` hub repo: pytorch_model.bin, no prefix, causal-mask buffers."""
    path = tmp_path_factory.mktemp("hf-bin")
    hf_tied.config.save_pretrained(path)
    sd = {k.removeprefix("transformer."): v for k, v in hf_tied.state_dict().items() if k != "lm_head.weight"}
    for i in range(LAYERS):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(CTX, CTX))[None, None]
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, path / "pytorch_model.bin")
    return path


def tampered(src, tmp_path, edit) -> str:
    dst = tmp_path / "tampered"
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


# --------------------------------------------------------------------------- Hugging Face import


@pytest.mark.parametrize(
    ("folder", "hf", "tied", "fmt"),
    [
        ("tied_dir", "hf_tied", True, "hf-safetensors"),
        ("untied_dir", "hf_untied", False, "hf-safetensors"),
        ("bin_dir", "hf_tied", True, "hf-bin"),
    ],
)
def test_hf_import_gives_identical_logits_and_greedy_text(request, folder, hf, tied, fmt):
    folder, hf = request.getfixturevalue(folder), request.getfixturevalue(hf)
    model = gpt(tie_weights=tied)
    report = load_pretrained_into(model, str(folder))
    assert report["init_format"] == fmt and report["unused_keys"] == [] and report["cropped_context"] is None
    json.dumps(report)  # logged to MLflow as JSON
    assert_same_logits(model, hf)
    prompt = tokens(6)[:1]
    ours = generate(model, prompt, 10)[0]
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False)
    assert ours == theirs[0, 6:].tolist()


def test_sharded_safetensors(hf_tied, tmp_path):
    hf_tied.save_pretrained(tmp_path, max_shard_size="5MB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    model = gpt()
    load_pretrained_into(model, str(tmp_path))
    assert_same_logits(model, hf_tied)


def test_tied_checkpoint_into_untied_model_copies_the_embedding(tied_dir, hf_tied):
    model = gpt(tie_weights=False)
    report = load_pretrained_into(model, str(tied_dir))
    assert report["head"] == "copied from the token embedding"
    assert torch.equal(model.head.weight, model.tok_emb.weight) and model.head.weight is not model.tok_emb.weight
    assert_same_logits(model, hf_tied)


def test_untied_checkpoint_into_tied_model_is_refused(untied_dir):
    with pytest.raises(CheckpointError, match=r"model\.tie_weights is True.*needs False"):
        load_pretrained_into(gpt(tie_weights=True), str(untied_dir))


def test_padded_vocabulary_keeps_its_extra_rows(tied_dir, hf_tied):
    model = gpt(pad_vocab_multiple=64)
    extra = model.tok_emb.weight[VOCAB:].clone()
    report = load_pretrained_into(model, str(tied_dir))
    assert model.tok_emb.weight.shape[0] == 50304 and report["padded_vocab_rows_kept"] == 47
    assert torch.equal(model.tok_emb.weight[VOCAB:], extra)
    assert_same_logits(model, hf_tied)


def test_shorter_context_crops_the_position_table(tied_dir, hf_tied):
    model = gpt(context_length=32)
    assert load_pretrained_into(model, str(tied_dir))["cropped_context"] == "64->32"
    assert_same_logits(model, hf_tied, n=32)
    with pytest.raises(CheckpointError, match=r"model\.context_length is 128, the checkpoint needs <= 64"):
        load_pretrained_into(gpt(context_length=128), str(tied_dir))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pos_emb": "rope"}, r"model\.pos_emb is 'rope', the checkpoint needs 'learned'"),
        ({"pos_emb": "sinusoidal"}, r"model\.pos_emb is 'sinusoidal'"),
        ({"d_model": 32}, r"model\.d_model is 32, the checkpoint needs 64"),
        ({"n_layers": 3}, r"model\.n_layers is 3, the checkpoint needs 2"),
        ({"n_heads": 2}, r"model\.n_heads is 2, the checkpoint needs 4"),
        ({"vocab_size": 1000}, r"model\.vocab_size is 1000, the checkpoint needs 50257"),
        ({"qkv_bias": False}, r"model\.qkv_bias=False .* non-zero biases .* set model\.qkv_bias=true"),
        ({"bias": False}, r"model\.bias=False .* set model\.bias=true"),
    ],
)
def test_incompatible_model_config_names_the_field(tied_dir, overrides, message):
    with pytest.raises(CheckpointError, match=message):
        load_pretrained_into(gpt(**overrides), str(tied_dir))


def test_wrong_tensor_shape_names_parameter_and_shapes(tied_dir, tmp_path):
    def edit(sd):
        sd["transformer.h.1.attn.c_attn.weight"] = sd["transformer.h.1.attn.c_attn.weight"][:, :190].contiguous()

    model = gpt()
    before = model.tok_emb.weight.clone()
    with pytest.raises(CheckpointError) as info:
        load_pretrained_into(model, tampered(tied_dir, tmp_path, edit))
    assert "blocks.1.attn.qkv.weight" in str(info.value) and "transformer.h.1.attn.c_attn.weight" in str(info.value)
    assert "has shape (190, 64), the model expects (192, 64)" in str(info.value)
    assert torch.equal(model.tok_emb.weight, before)  # nothing copied before the shapes were checked


def test_missing_and_unused_keys(tied_dir, tmp_path):
    missing = tampered(tied_dir, tmp_path / "a", lambda sd: sd.pop("transformer.ln_f.bias"))
    with pytest.raises(CheckpointError, match=r"lacks 1 required weight\(s\): ln_f\.bias"):
        load_pretrained_into(gpt(), missing)
    extra = tampered(tied_dir, tmp_path / "b", lambda sd: sd.update({"transformer.extra.scale": torch.ones(3)}))
    assert load_pretrained_into(gpt(), extra)["unused_keys"] == ["transformer.extra.scale"]


def test_bin_files_are_read_without_unpickling_objects(tied_dir, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(tied_dir / "config.json", folder)
    torch.save({"wte.weight": torch.zeros(2), "payload": object()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_pretrained_into(gpt(), str(folder))


def test_config_from_pretrained_builds_a_model_that_fits(tied_dir, untied_dir):
    fields = config_from_pretrained(str(tied_dir))
    assert fields == {
        "vocab_size": VOCAB,
        "context_length": CTX,
        "d_model": D,
        "n_heads": HEADS,
        "n_layers": LAYERS,
        "mlp_ratio": 4,
        "tie_weights": True,
        "layer_norm_eps": 1e-5,
        "qkv_bias": True,
        "bias": True,
        "pos_emb": "learned",
    }
    assert config_from_pretrained(str(untied_dir))["tie_weights"] is False
    load_pretrained_into(GPT(model_config("gpt2-small", **fields)), str(tied_dir))


def test_non_gpt2_variants_and_folders_are_refused(tied_dir, tmp_path):
    folder = tmp_path / "relu"
    shutil.copytree(tied_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(CheckpointError, match="activation_function 'relu'"):
        load_pretrained_into(gpt(), str(folder))
    with pytest.raises(CheckpointError, match="is not a pretrained GPT-2 folder"):
        load_pretrained_into(gpt(), str(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained_into(gpt(), str(tmp_path / "nope"))


# --------------------------------------------------------------------------- model ids (Hugging Face Hub)


def test_model_id_is_downloaded_with_huggingface_hub(tied_dir, hf_tied, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tied_dir)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    model = gpt()
    report = load_pretrained_into(model, "gpt2")
    assert report["init_source"] == "gpt2" and report["init_path"] == str(tied_dir)
    assert calls == [("gpt2", SAFETENSORS_PATTERNS)] and "model.safetensors" in SAFETENSORS_PATTERNS
    assert_same_logits(model, hf_tied)
    assert config_from_pretrained("openai-community/gpt2")["d_model"] == D
    assert calls[-1] == ("openai-community/gpt2", ["config.json"])


def test_model_id_without_safetensors_falls_back_to_pytorch_model_bin(bin_dir, tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    only_config = tmp_path / "snapshot"
    only_config.mkdir()
    shutil.copy(bin_dir / "config.json", only_config)

    def fake_snapshot_download(repo_id, allow_patterns):
        return str(bin_dir if "pytorch_model.bin" in allow_patterns else only_config)

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    assert load_pretrained_into(gpt(), "someone/old-gpt2")["init_format"] == "hf-bin"


def test_model_id_offline_or_without_huggingface_hub_explains_what_to_do(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id, allow_patterns):
        raise OSError("no connection")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"needs internet access .* pass a local folder"):
        load_pretrained_into(gpt(), "gpt2")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match=r"pip install 'gpt-orchestrator\[hub\]'"):
        load_pretrained_into(gpt(), "gpt2-medium")


# --------------------------------------------------------------------------- OpenAI TF checkpoints


def openai_params(hf) -> dict[str, np.ndarray]:
    """The variables of OpenAI's TF GPT-2 checkpoints, filled with ``hf``'s weights."""
    sd = {k.removeprefix("transformer."): v.numpy() for k, v in hf.state_dict().items()}
    params = {"model/wte": sd["wte.weight"], "model/wpe": sd["wpe.weight"]}
    params |= {"model/ln_f/g": sd["ln_f.weight"], "model/ln_f/b": sd["ln_f.bias"]}
    for i in range(LAYERS):
        for ln in ("ln_1", "ln_2"):
            params[f"model/h{i}/{ln}/g"] = sd[f"h.{i}.{ln}.weight"]
            params[f"model/h{i}/{ln}/b"] = sd[f"h.{i}.{ln}.bias"]
        for name in LINEARS:
            key = f"h.{i}.{name.replace('/', '.')}"
            params[f"model/h{i}/{name}/w"] = sd[f"{key}.weight"][None]  # (1, in, out)
            params[f"model/h{i}/{name}/b"] = sd[f"{key}.bias"]
    assert params["model/h0/attn/c_attn/w"].shape == (1, D, 3 * D)
    return params


HPARAMS = {"n_vocab": VOCAB, "n_ctx": CTX, "n_embd": D, "n_head": HEADS, "n_layer": LAYERS}


def test_openai_tf_mapping_gives_identical_logits(hf_tied):
    state, sources, unused = openai_tf_to_gptcore(openai_params(hf_tied))
    assert unused == [] and sources["blocks.0.attn.qkv.weight"].startswith("model/h0/attn/c_attn/w")
    model = gpt()
    pre = Pretrained(state, fields_from_openai_hparams(HPARAMS), "openai-tf", "memory", sources)
    copy_pretrained(model, pre)
    assert_same_logits(model, hf_tied)


def test_openai_tf_checkpoint_without_tensorflow_explains(tmp_path, monkeypatch):
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')
    (tmp_path / "hparams.json").write_text(json.dumps(HPARAMS))
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(CheckpointError, match=r"needs TensorFlow: pip install 'gpt-orchestrator\[tf\]'"):
        load_pretrained_into(gpt(), str(tmp_path))


def test_real_openai_tf_checkpoint(hf_tied, tmp_path):
    tf = pytest.importorskip("tensorflow")
    graph = tf.Graph()
    with graph.as_default():
        for name, value in openai_params(hf_tied).items():
            tf.compat.v1.get_variable(name, initializer=tf.constant(value))
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(tmp_path / "model.ckpt"))
    (tmp_path / "hparams.json").write_text(json.dumps(HPARAMS))
    assert config_from_pretrained(str(tmp_path))["context_length"] == CTX
    model = gpt()
    report = load_pretrained_into(model, str(tmp_path))
    assert report["init_format"] == "openai-tf" and report["unused_keys"] == []
    assert_same_logits(model, hf_tied)


# --------------------------------------------------------------------------- export


def saved_gptcore(tmp_path, **overrides):
    """A gptcore checkpoint of a random model with non-zero biases and LayerNorm parameters."""
    job = tiny_job(model={"preset": "tiny", "dropout": 0.0, **overrides})
    model = GPT(job.model).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.1)
    path = save_checkpoint(tmp_path / "ckpt", model=model, config=job, state=TrainState(step=3))
    return model, path


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_weights": False, "pad_vocab_multiple": 64, "qkv_bias": False, "bias": False}],
    ids=["gpt2", "untied-padded-biasfree"],
)
def test_export_loads_in_transformers_and_round_trips(tmp_path, overrides):
    model, ckpt = saved_gptcore(tmp_path, **overrides)
    out = export_hf(ckpt, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    assert not list(tmp_path.glob(".hf.tmp-*"))
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.tie_word_embeddings is (not overrides)
    assert_same_logits(model, hf)

    again = gpt(**overrides)
    report = load_pretrained_into(again, str(out))
    expected = {k: v[:VOCAB] if v.shape[0] > VOCAB else v for k, v in model.state_dict().items()}
    got = {k: v[:VOCAB] if v.shape[0] > VOCAB else v for k, v in again.state_dict().items()}
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert bool(report["zero_biases_dropped"]) is bool(overrides)

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "Every effort moves you<|endoftext|> forward."
    assert tokenizer(text)["input_ids"] == encode(text)


def test_export_refuses_what_gpt2_cannot_express_and_non_empty_folders(tmp_path):
    _, rope = saved_gptcore(tmp_path / "rope", pos_emb="rope")
    with pytest.raises(CheckpointError, match=r"model\.pos_emb='rope' cannot be exported"):
        export_hf(rope, tmp_path / "out-rope")
    _, ckpt = saved_gptcore(tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty"):
        export_hf(ckpt, tmp_path / "busy")
    assert export_hf(ckpt, tmp_path / "busy", overwrite=True) == tmp_path / "busy"
    assert not (tmp_path / "busy" / "notes.txt").exists()


# --------------------------------------------------------------------------- train.init_from


class FirstEval(Hooks):
    def __init__(self):
        self.metrics, self.report = None, None

    def on_train_start(self, ctx, state):
        self.report = ctx.init_report

    def on_eval(self, ctx, state, metrics, sample, save):
        self.metrics = self.metrics or metrics


@torch.no_grad()
def test_train_init_from_local_hf_folder(tied_dir, hf_tied):
    job = tiny_job(
        model={"preset": "tiny", "dropout": 0.0},
        train={"init_from": str(tied_dir), "precision": "fp32", "lr": 1e-12, "weight_decay": 0.0, "max_steps": 1},
    )
    model, report = build_model(job, torch.device("cpu"))
    assert report["init_from"] == str(tied_dir) and report["init_format"] == "hf-safetensors"
    assert_same_logits(model.eval(), hf_tied)

    with torch.enable_grad():
        hooks = FirstEval()
        result = train(job, hooks)
    assert result.status == "finished" and hooks.report["init_format"] == "hf-safetensors"
    _, val = build_datasets(job)
    batches = list(make_loader(val, job.train.batch_size, shuffle=False, drop_last=False))[: job.train.eval_iters]
    hf_loss = sum(lm_loss(hf_tied(x).logits, y).item() for x, y in batches) / len(batches)
    assert math.isclose(hooks.metrics["val_loss"], hf_loss, rel_tol=1e-4)
