"""Pretrain a GPT-2-shaped gpt2-small briefly on tinyshakespeare: the warm arm of warmstart_vs_scratch offline."""
from gptcore.config import JobConfig
from gptcore.train import LocalCheckpoints, PrintProgress, HookList, train

job = JobConfig.from_dict({
    "model": {"preset": "gpt2-small", "context_length": 256},  # GPT-2's own architecture, as the experiment
    "data": {"corpus": "tinyshakespeare"},
    "train": {"batch_size": 4, "max_steps": 120, "lr": 6e-4, "warmup_steps": 10, "eval_every": 40},
})
train(job, HookList(PrintProgress(), LocalCheckpoints("pretrained/shakespeare-120")))
