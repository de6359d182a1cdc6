"""gradavg's math: chapter 2 of Nielsen's book in numpy, and nothing else.

The math is numpy; ``core.kernels`` compiles the training path's inner loop with numba
(the same products, for speed at small mini-batches), and tests hold it to the numpy
path. Nothing here knows of Ray, MLflow, configs or jobs. Examples are rows of a 2-D
array throughout, where the book uses columns; weight shapes and layer indices are the book's.
"""

from core.average import add_in_order, average, chunk_bounds, descend, update_in_place
from core.backprop import Workspace, backprop_example, gradient_sum, per_example_gradient_sum
from core.functions import ACTIVATIONS, COSTS, one_hot, sigmoid
from core.gradcheck import TOLERANCES, finite_difference_gradient, gradient_check
from core.network import DTYPES, INITS, Network, parameter_count, split_params

__all__ = [
    "ACTIVATIONS", "COSTS", "DTYPES", "INITS", "TOLERANCES", "Network", "Workspace", "add_in_order",
    "average", "backprop_example", "chunk_bounds", "descend", "finite_difference_gradient", "gradient_check",
    "gradient_sum", "one_hot", "parameter_count", "per_example_gradient_sum", "sigmoid", "split_params",
    "update_in_place",
]
