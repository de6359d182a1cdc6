"""The trained network as an MLflow pyfunc model: rows of inputs in, labels out (or, asked through
``params={"output": ...}`` at predict time, the output activations a^L or class probabilities).

Logged as "model from code": MLflow stores this file and ``core`` with the model and runs
this file to build it, so loading the model unpickles nothing.

Input: one row of ``sizes[0]`` numbers per example, as a numpy array (float64 or float32), a pandas
DataFrame or a list of rows; the model's signature checks the count and that the numbers are floats
(integers are refused, not silently cast), and NaN or infinite values are refused. The inputs are used
as they are, never rescaled: a network trained on inputs in [0, 1] (every bundled dataset) refuses a
value above 1, the sign of unscaled pixels, with the fix (divide pixels in [0, 255] by 255, the
digits' 0 to 16 by 16), and a value below 0. No rows in, no rows out.
"""

import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model

from core import Network

OUTPUTS = ("labels", "probabilities", "activations")


class DigitClassifier(mlflow.pyfunc.PythonModel):
    """Predicts argmax_j a^L_j for each row, with the weights saved as ``weights.npz``."""

    def load_context(self, context):
        self.network = Network.load(context.artifacts["weights"])
        inputs = context.artifacts.get("inputs")  # what the network was trained on (models logged before it: none)
        self.unit_range = bool(inputs and json.loads(Path(inputs).read_text()).get("in_unit_range"))

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        """``params={"output": "labels"}`` (the default): each row's most activated output neuron;
        ``"probabilities"``: the output activations a^L scaled to sum to 1 per row; ``"activations"``: a^L."""
        output = (params or {}).get("output", "labels")
        if output not in OUTPUTS:
            raise ValueError(f"params output={output!r}: ask for one of {', '.join(OUTPUTS)}")
        x = np.ascontiguousarray(model_input, dtype=self.network.dtype)  # a DataFrame's columns: rows, as trained
        if x.ndim == 1:
            x = x[None, :]
        x = x.reshape(x.shape[0], -1) if x.shape[0] else x.reshape(0, self.network.sizes[0])  # no rows: none out
        if not np.all(np.isfinite(x)):
            raise ValueError("an input value is NaN or infinite; pass finite numbers")
        if self.unit_range and x.size and x.max() > 1.0:
            raise ValueError(f"an input value is {x.max():g}, but this network was trained on inputs in [0, 1]; "
                             "scale the inputs as its training data was (pixels in [0, 255]: divide by 255; "
                             "scikit-learn's digits, 0 to 16: divide by 16)")
        if self.unit_range and x.size and x.min() < 0.0:
            raise ValueError(f"an input value is {x.min():g}, but this network was trained on inputs in [0, 1]; "
                             "pass inputs scaled as its training data was, in [0, 1] (not centred on 0)")
        if output == "labels":
            return self.network.predict(x)
        activations = self.network.feedforward(x)
        if output == "activations":
            return activations
        return activations / activations.sum(axis=1, keepdims=True)


set_model(DigitClassifier())
