"""MLflow models-from-code wrapper: logged as a file path, the bundle travels as an artifact.

`mlflow models serve`, `mlflow.pyfunc.load_model` and `mlflow.pyfunc.spark_udf` load this
file, which rebuilds the predictor from the bundle (JSON + safetensors; nothing pickled).
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd


class TabrecPyfunc(mlflow.pyfunc.PythonModel):
    """Predict from raw records: Kaggle-schema rows (tabular) or user/item pairs (ratings)."""

    def load_context(self, context: Any) -> None:
        from modeling.predictors import load_predictor

        self.predictor = load_predictor(context.artifacts["bundle"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        return self.predictor.predict(model_input)


mlflow.models.set_model(TabrecPyfunc())
