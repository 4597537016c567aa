"""Ray Train / Ray Tune / MLflow orchestration of gptcore experiments."""
