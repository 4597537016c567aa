"""Ray Train / Ray Tune / MLflow orchestration of gptcore experiments.

Experiment files import `Experiment`, `grid` and `ASHA` from here; the rest lives in submodules.
"""

from orchestrator.experiment import ASHA, Experiment, grid

__all__ = ["ASHA", "Experiment", "grid"]
