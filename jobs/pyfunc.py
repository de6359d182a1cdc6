"""The trained network as an MLflow pyfunc model: pixel rows in, digit labels out.

Logged as "model from code": MLflow stores this file and ``core`` with the model and runs
this file to build it, so loading the model unpickles nothing.
"""

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model

from core import Network


class DigitClassifier(mlflow.pyfunc.PythonModel):
    """Predicts argmax_j a^L_j for each row, with the weights saved as ``weights.npz``."""

    def load_context(self, context):
        self.network = Network.load(context.artifacts["weights"])

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        x = np.asarray(model_input, dtype=self.network.dtype)
        if x.ndim == 1:
            x = x[None, :]
        return self.network.predict(x.reshape(x.shape[0], -1))


set_model(DigitClassifier())
