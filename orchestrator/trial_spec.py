"""What the driver hands each trial (`TrialSpec`), and its one serialised form: in sweep.json and the loop config.

Light on purpose: Tune's trial actors and Ray Train's workers import it (no Ray, no MLflow, no torch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gptcore.config import JobConfig
from orchestrator.decoding import DecodeConfig


@dataclass(frozen=True)
class TrialSpec:
    """One trial as the driver planned it: its grid values, its validated job, its MLflow run and its dataset."""

    name: str
    params: dict[str, Any]  # grid values, by dotted key
    job: JobConfig | DecodeConfig
    run_id: str  # the trial's MLflow child run, created by the driver
    dataset: str | None = None  # a training trial's prepared dataset (folder or URI)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; the job as its config sections (``{"decode": {...}}`` for a decode trial)."""
        return {
            "name": self.name,
            "params": self.params,
            "config": job_sections(self.job),
            "run_id": self.run_id,
            "dataset": self.dataset,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrialSpec:
        config = raw["config"]
        job = DecodeConfig.from_dict(config["decode"]) if "decode" in config else JobConfig.from_dict(config)
        return cls(raw["name"], raw["params"], job, raw["run_id"], raw.get("dataset"))


def job_sections(job: JobConfig | DecodeConfig) -> dict[str, dict[str, Any]]:
    """The job as nested config sections, every field resolved (no preset left to apply)."""
    if isinstance(job, DecodeConfig):
        return {"decode": dataclasses.asdict(job)}
    return job.to_dict()
