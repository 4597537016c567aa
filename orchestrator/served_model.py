"""The python model of a registered gptcore model, as MLflow "models from code": nothing is pickled.

`orchestrator.registry` logs this file as the model's code; MLflow runs it when it loads the model.
"""

import mlflow.models

from orchestrator.registry import GptcoreModel

mlflow.models.set_model(GptcoreModel())
