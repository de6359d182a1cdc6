"""gradavg's math: chapter 2 of Nielsen's book, the reference in numpy and its compiled copy.

The reference says what is computed and is read like the book: the network and eq. 25
(``core.network``), BP1–BP4 (``core.backprop``), one training step's cuts, in-order add and
update (``core.step``). Training runs compiled copies of the backward pass and the step
(``core.kernels``, numba, calling SciPy's BLAS through ``core.blas``), which tests hold to the
reference; they are imported only by code that trains (``core.chunks``), not by ``import core``.
Nothing here knows of Ray, MLflow, configs or jobs. Examples are rows of a 2-D array in every
argument, where the book uses columns; weight shapes and layer indices are the book's.
"""

from core.backprop import backprop_example, gradient_sum, per_example_gradient_sum
from core.functions import ACTIVATIONS, COSTS, one_hot, sigmoid
from core.gradcheck import TOLERANCES, finite_difference_gradient, gradient_check
from core.network import DTYPES, INITS, Network, parameter_count, split_params
from core.step import add_in_order, batch_count, chunk_bounds, descend, mini_batch, update_in_place

__all__ = [
    "ACTIVATIONS", "COSTS", "DTYPES", "INITS", "TOLERANCES", "Network", "add_in_order", "backprop_example",
    "batch_count", "chunk_bounds", "descend", "finite_difference_gradient", "gradient_check", "gradient_sum",
    "mini_batch", "one_hot", "parameter_count", "per_example_gradient_sum", "sigmoid", "split_params",
    "update_in_place",
]
