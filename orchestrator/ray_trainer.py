"""The `TorchTrainer` of a trial: Ray Train without the Ray Data machinery that a loop reading its own token shards
never uses. Imported by the Tune trial actor only (`orchestrator.trial`)."""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback


class ShardTrainer(TorchTrainer):
    """A `TorchTrainer` given no Ray Dataset (gptcore reads its shards itself) starts no `DatasetManager`.

    Ray Train (2.60) adds its `DatasetsCallback` to every run, and the callback starts a `DatasetManager` actor at
    every worker-group start, datasets or none: one more process, and its imports, on the head node per trial start
    (and per restart after a failure). With no dataset there is nothing for it to shard.
    """

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]
