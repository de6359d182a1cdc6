"""Core's math against oracles: finite differences, the per-example path, hand-worked numbers."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import core
from core import Network, add_in_order, blas, chunk_bounds, gradient_sum, kernels, split_params, step, update_in_place
from core.functions import ACTIVATIONS, Activation
from core.network import write_npz


def random_problem(sizes, cost, init, seed, m=7, dtype="float64"):
    net = Network.create(sizes, init=init, seed=seed, cost=cost, dtype=dtype)
    rng = np.random.default_rng(seed + 100)
    return net, rng.random((m, sizes[0])), rng.integers(0, sizes[-1], m)


INFRASTRUCTURE = {"ray", "mlflow", "yaml", "jobs", "cluster"}


def test_core_imports_no_infrastructure():
    """Every module of core, the compiled ones included, imported in a fresh process after the
    libraries core is built on: none of them brings in Ray, MLflow, YAML, the cluster or the jobs
    (numba itself imports yaml to read its own config, so that is counted from core's imports on)."""
    code = ("import importlib, pkgutil, sys, numpy, numba, scipy.linalg.cython_blas, threadpoolctl\n"
            "before = set(sys.modules)\n"
            "import core\n"
            "names = [m.name for m in pkgutil.iter_modules(core.__path__, 'core.')]\n"
            "for name in names: importlib.import_module(name)\n"
            "print(' '.join(names)); print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))")
    names, imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout.splitlines()
    assert {"core.backprop", "core.blas", "core.chunks", "core.kernels", "core.step"} <= set(names.split())
    assert not INFRASTRUCTURE & set(imported.split())
    for path in Path(core.__file__).parent.glob("*.py"):  # nor does core's own code name them
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not INFRASTRUCTURE & {m.split(".")[0] for m in modules}, path.name


def test_shapes_follow_the_book():
    net = Network.create([784, 30, 10], seed=0)
    assert [w.shape for w in net.weights] == [(30, 784), (10, 30)]
    assert [b.shape for b in net.biases] == [(30,), (10,)]
    assert net.params.size == core.parameter_count([784, 30, 10]) == 784 * 30 + 30 * 10 + 40
    assert all(np.shares_memory(w, net.params) for w in net.weights)


def test_initialisations_have_the_stated_spread():
    standard = Network.create([400, 300, 10], init="standard", seed=3)
    scaled = Network.create([400, 300, 10], init="scaled", seed=3)
    assert standard.weights[0].std() == pytest.approx(1.0, rel=0.01)
    assert scaled.weights[0].std() == pytest.approx(1 / np.sqrt(400), rel=0.01)
    assert scaled.biases[0].std() == pytest.approx(1.0, rel=0.15)
    assert np.array_equal(standard.params, Network.create([400, 300, 10], seed=3).params)
    assert not np.array_equal(standard.params, Network.create([400, 300, 10], seed=4).params)


def test_feedforward_is_eq25_layer_by_layer():
    net, x, _ = random_problem([5, 4, 3], "quadratic", "standard", 1)
    a = x[2]
    for w, b in zip(net.weights, net.biases):
        a = 1.0 / (1.0 + np.exp(-(w @ a + b)))
    np.testing.assert_allclose(net.feedforward(x)[2], a, rtol=1e-14)


@pytest.mark.parametrize("cost", ["quadratic", "cross_entropy"])
@pytest.mark.parametrize("init", ["standard", "scaled"])
@pytest.mark.parametrize("sizes", [[6, 4], [7, 5, 3], [6, 5, 4, 3]])
def test_gradient_check_float64(cost, init, sizes):
    net, x, y = random_problem(sizes, cost, init, seed=len(sizes))
    assert core.gradient_check(net, x, y) < 1e-7


@pytest.mark.parametrize("cost", ["quadratic", "cross_entropy"])
def test_gradient_check_float32(cost):
    net, x, y = random_problem([8, 6, 4], cost, "scaled", seed=5, dtype="float32")
    assert net.params.dtype == np.float32
    assert core.gradient_check(net, x, y) < core.TOLERANCES["float32"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cost", ["quadratic", "cross_entropy"])
def test_gradient_check_of_the_compiled_training_path(cost, dtype):
    """The sums training uses, against finite differences, over 40 examples (two input blocks)."""
    net, x, y = random_problem([20, 12, 6], cost, "scaled", seed=8, m=40, dtype=dtype)
    worst = core.gradient_check(net, x, y, gradient=kernels.compiled_gradient_sum)
    assert worst < core.TOLERANCES[dtype]
    wrong = core.gradient_check(net, x[:, ::-1], y, gradient=lambda n, xs, ys: kernels.compiled_gradient_sum(
        n, np.ascontiguousarray(xs[:, ::-1]), ys))  # backprop on other inputs than the differences see
    assert wrong > 1e-2


def test_gradient_check_catches_a_wrong_gradient(monkeypatch):
    """The check is an oracle only if it fails on a wrong backprop: ∂C/∂w^2 scaled by 1.01."""
    net, x, y = random_problem([5, 4, 3], "quadratic", "standard", 2)
    import core.gradcheck as gc

    def wrong_sum(network, xs, labels):
        nabla, n = gradient_sum(network, xs, labels)
        nabla[: network.weights[0].size] *= 1.01
        return nabla, n

    monkeypatch.setattr(gc, "gradient_sum", wrong_sum)
    assert core.gradient_check(net, x, y) > 1e-3


@pytest.mark.parametrize("cost", ["quadratic", "cross_entropy"])
@pytest.mark.parametrize("sizes", [[6, 4], [7, 5, 3], [9, 6, 5, 4]])
def test_batched_sum_equals_per_example_sum(cost, sizes):
    net, x, y = random_problem(sizes, cost, "standard", seed=11, m=23)
    batched, n = gradient_sum(net, x, y)
    looped, n_looped = core.per_example_gradient_sum(net, x, y)
    assert n == n_looped == 23
    assert np.max(np.abs(batched - looped)) <= 1e-12 * np.max(np.abs(looped))


def test_unequal_parts_average_to_the_whole_batch():
    net, x, y = random_problem([7, 5, 3], "cross_entropy", "scaled", 8, m=17)
    whole, n = gradient_sum(net, x, y)
    parts = [gradient_sum(net, x[:3], y[:3]), gradient_sum(net, x[3:], y[3:])]
    total, count = add_in_order(parts)
    assert count == n == 17
    np.testing.assert_allclose(total / count, whole / n, rtol=1e-13, atol=1e-16)
    mean_of_means = (parts[0][0] / 3 + parts[1][0] / 14) / 2
    assert not np.allclose(mean_of_means, whole / n, rtol=1e-6)


def test_add_in_order_is_left_to_right():
    parts = [(np.array([1e16]), 1), (np.array([1.0]), 1), (np.array([-1e16]), 1)]
    total, count = add_in_order(parts)
    assert count == 3 and total[0] == 0.0  # (1e16 + 1) - 1e16 rounds to 0 in float64
    assert parts[0][0][0] == 1e16  # the first part was copied, not mutated


def test_chunk_bounds_do_not_depend_on_anything_but_n_and_size():
    assert chunk_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chunk_bounds(3, 5) == [(0, 3)]
    assert chunk_bounds(0, 5) == []
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_bounds(3, 0)


def test_an_epoch_is_cut_into_mini_batches_as_chunks_are_cut():
    order = np.array([7, 3, 9, 0, 5, 1, 8, 2, 6, 4, 10])  # 11 examples, mini-batches of 4: 4, 4, 3
    assert core.batch_count(11, 4) == 3 and core.batch_count(12, 4) == 3 and core.batch_count(13, 4) == 4
    assert [core.mini_batch(order, 4, s).tolist() for s in range(3)] == [[7, 3, 9, 0], [5, 1, 8, 2], [6, 4, 10]]
    assert [(lo, hi) for lo, hi in chunk_bounds(11, 4)] == [step.piece(s, 4, 11) for s in range(3)]


def test_the_compiled_cuts_are_the_reference_cuts():
    """``core.kernels``' copies of ``core.step.piece`` and ``piece_count``, on every case up to 40."""
    for n in range(41):
        for size in range(1, 13):
            assert kernels._piece_count(n, size) == step.piece_count(n, size)
            for index in range(step.piece_count(n, size) + 1):
                assert kernels._piece(index, size, n) == step.piece(index, size, n)


def test_hand_worked_2_2_1_network():
    """Every number below was worked out by hand (to 10 places) from eq. 25 and BP1-BP4.

    w2 = [[0.1, 0.2], [0.3, 0.4]], b2 = 0; w3 = [[0.5, 0.6]], b3 = 0; x = [1, 0]; one output
    neuron whose desired value is 1 (label 0 of one class), quadratic cost.
    z2 = [0.1, 0.3], a2 = σ(z2) = [0.5249791875, 0.5744425168]
    z3 = 0.5·0.5249791875 + 0.6·0.5744425168 = 0.6071551038, a3 = σ(z3) = 0.6472915700
    BP1: δ3 = (a3 − 1)·a3(1 − a3) = −0.3527084300 · 0.2283051934 = −0.0805251663
    BP3, BP4: ∂C/∂b3 = δ3, ∂C/∂w3 = δ3·a2 = [−0.0422740364, −0.0462570792]
    BP2: δ2 = w3ᵀδ3 ⊙ σ'(z2) = [−0.0402625832·0.2493760402, −0.0483150998·0.2444583117]
       = [−0.0100405236, −0.0118110277]
    ∂C/∂w2 = δ2 xᵀ = [[−0.0100405236, 0], [−0.0118110277, 0]], ∂C/∂b2 = δ2
    C = ½(1 − a3)² = 0.0622016183
    """
    params = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.0, 0.0, 0.0])
    net = Network([2, 2, 1], params, cost="quadratic")
    nabla, n = gradient_sum(net, np.array([[1.0, 0.0]]), np.array([0]))
    nabla_w, nabla_b = split_params(nabla, net.sizes)
    assert n == 1
    np.testing.assert_allclose(nabla_w[1], [[-0.0422740364, -0.0462570792]], atol=1e-9)
    np.testing.assert_allclose(nabla_b[1], [-0.0805251663], atol=1e-9)
    np.testing.assert_allclose(nabla_w[0], [[-0.0100405236, 0.0], [-0.0118110277, 0.0]], atol=1e-9)
    np.testing.assert_allclose(nabla_b[0], [-0.0100405236, -0.0118110277], atol=1e-9)
    cost, accuracy = net.evaluate(np.array([[1.0, 0.0]]), np.array([0]))
    assert cost == pytest.approx(0.0622016183, abs=1e-10) and accuracy == 1.0


def test_update_with_and_without_weight_decay():
    net = Network([1, 1], np.array([2.0, 1.0]))
    update_in_place(net, np.array([0.5, 0.25]), count=5, eta=2.0)
    np.testing.assert_array_equal(net.params, [2.0 - 2.0 * 0.1, 1.0 - 2.0 * 0.05])
    net = Network([1, 1], np.array([2.0, 1.0]))
    update_in_place(net, np.array([0.5, 0.25]), count=5, eta=2.0, lmbda=10.0, n_train=100)
    # w ← (1 − ηλ/n) w − η ∂C/∂w = 0.8·2 − 0.2; the bias is not decayed
    np.testing.assert_allclose(net.params, [0.8 * 2.0 - 0.2, 1.0 - 0.1], rtol=1e-15)


def test_cross_entropy_value_by_hand():
    net = Network([1, 2], np.array([0.0, 0.0, 0.0, 0.0]), cost="cross_entropy")
    cost, _ = net.evaluate(np.array([[1.0]]), np.array([1]))
    assert cost == pytest.approx(2 * np.log(2), rel=1e-14)  # a = [½, ½] against y = [0, 1]


def test_evaluate_counts_argmax_hits():
    net = Network([2, 2], np.array([1.0, 0.0, 0.0, 1.0, 0.0, 0.0]))  # identity weights
    x = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    _, accuracy = net.evaluate(x, np.array([0, 1, 1, 0]))
    assert accuracy == 0.75


def test_write_npz_leaves_nothing_behind_when_writing_fails(tmp_path):
    class Unwritable:
        def __array__(self, *args, **kwargs):
            raise OSError("disk full")

    write_npz(tmp_path / "a.npz", {"x": np.arange(3)})
    with pytest.raises(OSError, match="disk full"):
        write_npz(tmp_path / "a.npz", {"x": Unwritable()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]  # the old file whole, no temporary left
    with np.load(tmp_path / "a.npz") as data:
        assert data["x"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_save_and_load_round_trip(tmp_path, dtype):
    net = Network.create([6, 5, 3], init="scaled", seed=9, cost="cross_entropy", dtype=dtype)
    net.save(tmp_path / "weights.npz")
    with np.load(tmp_path / "weights.npz", allow_pickle=False) as data:
        assert sorted(data.files) == ["activation", "biases_0", "biases_1", "cost", "sizes",
                                      "weights_0", "weights_1"]
        assert data["weights_0"].shape == (5, 6) and data["biases_1"].shape == (3,)
        assert str(data["cost"]) == "cross_entropy"
    loaded = Network.load(tmp_path / "weights.npz")
    assert loaded.sizes == [6, 5, 3] and loaded.cost == "cross_entropy" and loaded.dtype == np.dtype(dtype)
    assert np.array_equal(loaded.params, net.params)
    assert not list(tmp_path.glob("*.part"))


def test_load_refuses_a_file_that_is_not_weights(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a gradavg weights file"):
        Network.load(tmp_path / "other.npz")


def test_names_are_looked_up_in_one_table():
    assert set(core.COSTS) == {"quadratic", "cross_entropy"} and set(core.ACTIVATIONS) == {"sigmoid"}
    with pytest.raises(ValueError, match="unknown cost 'hinge'; valid: quadratic, cross_entropy"):
        Network.create([2, 2], cost="hinge")
    with pytest.raises(ValueError, match="unknown init"):
        Network.create([2, 2], init="xavier")


def test_sigmoid_does_not_overflow():
    with np.errstate(all="raise"):
        np.testing.assert_array_equal(core.sigmoid(np.array([-1000.0, 0.0, 1000.0])), [0.0, 0.5, 1.0])


# ------------------------------------------------------------------ the compiled path (core.kernels)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cost", ["quadratic", "cross_entropy"])
@pytest.mark.parametrize("sizes", [[6, 4], [7, 5, 3], [9, 6, 5, 4]])
def test_compiled_chunk_sum_equals_per_example_sum(sizes, cost, dtype):
    """The compiled sum of rows picked out of a larger set, against the book's one-example-at-a-time path:
    71 rows, so the input layer's products run in blocks of 32, 32 and 7 (``INPUT_BLOCK``)."""
    assert kernels.INPUT_BLOCK == 32
    net, x, y = random_problem(sizes, cost, "standard", seed=13, m=90, dtype=dtype)
    x = x.astype(dtype)
    rows = np.random.default_rng(2).permutation(90)[:71]
    ws = kernels.Workspace(sizes, 75, dtype)
    out = np.full_like(net.params, np.nan)
    nabla, n = kernels.chunk_gradient_sum(net, x, y, rows, out, ws)
    looped, _ = core.per_example_gradient_sum(net.astype("float64"), x[rows].astype("float64"), y[rows])
    assert n == 71 and nabla is out and nabla.dtype == np.dtype(dtype)
    bound = 1e-12 if dtype == "float64" else 1e-5
    assert np.max(np.abs(nabla - looped)) <= bound * np.max(np.abs(looped))


def test_compiled_workspace_reuse_and_an_empty_chunk():
    net, x, y = random_problem([10, 8, 4], "quadratic", "standard", 4, m=12)
    ws = kernels.Workspace(net.sizes, 12, net.dtype)
    first = kernels.chunk_gradient_sum(net, x, y, np.arange(12), np.empty_like(net.params), ws)[0].copy()
    kernels.chunk_gradient_sum(net, x, y, np.arange(3, 8), np.empty_like(net.params), ws)  # smaller, in between
    again = kernels.chunk_gradient_sum(net, x, y, np.arange(12), np.empty_like(net.params), ws)[0]
    assert np.array_equal(again, first)
    empty, n = kernels.chunk_gradient_sum(net, x, y, np.arange(0), np.ones_like(net.params), ws)
    assert n == 0 and not empty.any()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("lmbda", [0.0, 2.5])
@pytest.mark.parametrize("batch_size, chunk_size, slots", [(10, None, 1), (23, 10, 2), (23, 5, 3), (23, 10, 1)])
def test_compiled_steps_give_the_bits_of_sums_then_updates(dtype, lmbda, batch_size, chunk_size, slots):
    """``run_steps`` (the single-process path) and ``descend`` ending in ``add_and_update_rows`` (the Ray
    driver's) against the reference step, ``core.step.descend``: each step's chunk sums added in order, then numpy's
    ``update_in_place``. The same bits, with a short last mini-batch. Mini-batches of 23 in chunks
    of 10 or 5 are computed on 1 to 3 workspace slots at once."""
    net, x, y = random_problem([12, 7, 5], "quadratic", "standard", 6, m=53, dtype=dtype)
    x = x.astype(dtype)
    order = np.random.default_rng(9).permutation(53)  # 10s: five, then 3; 23s: two, then 7
    fused, stepped = net.copy(), net.copy()
    rows = min(batch_size, chunk_size or batch_size)
    ws = kernels.Workspace(net.sizes, rows, dtype, slots)
    n_chunks = -(-batch_size // rows)
    sums = np.empty((n_chunks + 1, net.params.shape[0]), dtype)
    steps = -(-53 // batch_size)
    kernels.run_steps(fused, x, y, order, 0, 2, batch_size, 0.7, lmbda, sums, ws, chunk_size)
    kernels.run_steps(fused, x, y, order, 2, steps, batch_size, 0.7, lmbda, sums, ws, chunk_size)

    def chunk_sums(network, batch):
        return [kernels.chunk_gradient_sum(network, x, y, batch[lo:hi], np.empty_like(network.params), ws)
                for lo, hi in chunk_bounds(batch.shape[0], rows)]

    core.descend(chunk_sums, stepped, order, 0, steps, batch_size, 0.7, lmbda)
    assert not np.array_equal(fused.params, net.params)
    assert np.array_equal(fused.params, stepped.params)

    def chunk_rows(network, batch):  # as a Ray driver receives them: a row per chunk, one spare
        bounds = chunk_bounds(batch.shape[0], rows)
        out = np.empty((len(bounds) + 1, network.params.shape[0]), dtype)
        counts = [kernels.chunk_gradient_sum(network, x, y, batch[lo:hi], out[c], ws)[1]
                  for c, (lo, hi) in enumerate(bounds)]
        return out, sum(counts)

    driven = net.copy()
    core.descend(chunk_rows, driven, order, 0, steps, batch_size, 0.7, lmbda, kernels.add_and_update_rows)
    assert np.array_equal(driven.params, stepped.params)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("lmbda", [0.0, 2.5])
@pytest.mark.parametrize("n_chunks", [1, 2, 5])
def test_compiled_add_and_update_is_add_in_order_then_update_in_place(dtype, lmbda, n_chunks):
    """The end of every training step against its reference, bit for bit: chunk sums of very
    different sizes, so that the order of the additions shows in the last bits."""
    net = Network.create([12, 7, 5], seed=3, dtype=dtype)
    rng = np.random.default_rng(n_chunks)
    sums = (rng.standard_normal((n_chunks + 1, net.params.size)) * 10.0 ** rng.integers(-6, 6, (n_chunks + 1, 1)))
    sums = sums.astype(dtype)
    reference, compiled = net.copy(), net.copy()
    total, count = add_in_order((row, 4) for row in sums[:n_chunks])
    update_in_place(reference, total, count, 0.7, lmbda, n_train=50)
    kernels.add_and_update(compiled, sums.copy(), n_chunks, 4 * n_chunks, 0.7, lmbda, 50)
    assert not np.array_equal(compiled.params, net.params)
    assert np.array_equal(compiled.params, reference.params)


def test_add_and_update_refuses_what_it_cannot_add():
    net, x, y = random_problem([12, 7, 5], "quadratic", "standard", 6, m=10)
    sums = np.zeros((3, net.params.shape[0]))
    with pytest.raises(ValueError, match="one per chunk \\(3\\) and one for their total"):
        kernels.add_and_update(net, sums, 3, 10, 0.5, 0.0, 10)
    with pytest.raises(ValueError, match="zero examples"):
        kernels.add_and_update(net, sums, 2, 0, 0.5, 0.0, 10)
    with pytest.raises(ValueError, match="float64 rows"):
        kernels.add_and_update(net, sums.astype(np.float32), 2, 10, 0.5, 0.0, 10)


def test_compiled_path_refuses_buffers_it_would_overrun():
    """The compiled code checks no bounds, so its entry points check the buffers they are given."""
    net, x, y = random_problem([12, 7, 5], "quadratic", "standard", 6, m=53)
    order = np.arange(53)
    small = kernels.Workspace(net.sizes, 8, net.dtype)
    with pytest.raises(ValueError, match="does not fit chunks of 10 rows"):
        kernels.chunk_gradient_sum(net, x, y, order[:10], np.empty_like(net.params), small)
    with pytest.raises(ValueError, match="does not fit chunks of 10 rows"):
        kernels.run_steps(net, x, y, order, 0, 1, 23, 0.5, 0.0, np.empty((4, net.params.size)), small, 10)
    ws = kernels.Workspace(net.sizes, 10, net.dtype, 2)
    with pytest.raises(ValueError, match="sums has 3 rows; mini-batches of 23 in chunks of 10 need"):
        kernels.run_steps(net, x, y, order, 0, 1, 23, 0.5, 0.0, np.empty((3, net.params.size)), ws, 10)
    with pytest.raises(ValueError, match="typed like network.params"):
        kernels.run_steps(net, x, y, order, 0, 1, 23, 0.5, 0.0, np.empty((4, net.params.size), np.float32), ws, 10)
    with pytest.raises(ValueError, match="x is float32 with 12 inputs; the network takes float64"):
        kernels.chunk_gradient_sum(net, x.astype(np.float32), y, order[:10], np.empty_like(net.params), ws)
    before = net.params.copy()
    kernels.run_steps(net, x, y, order, 0, 1, 23, 0.5, 0.0, np.empty((4, net.params.size)), ws, 10)
    assert not np.array_equal(net.params, before)  # the same call with buffers that fit


def test_compiled_path_refuses_an_activation_other_than_sigmoid(monkeypatch):
    """The kernels compute σ and σ' as the sigmoid's: a network with another activation is refused,
    not trained as a sigmoid network. Only sigmoid is in the table, so a second one is added here."""
    monkeypatch.setitem(ACTIVATIONS, "tanh", Activation("tanh", np.tanh, lambda a: 1.0 - a * a))
    net, x, y = random_problem([12, 7, 5], "quadratic", "standard", 6, m=20)
    net = Network(net.sizes, net.params, net.cost, activation="tanh")
    assert gradient_sum(net, x, y)[1] == 20  # the numpy reference takes any activation of the table
    ws = kernels.Workspace(net.sizes, 10, net.dtype)
    message = "implements the sigmoid activation only, not 'tanh'"
    with pytest.raises(ValueError, match=message):
        kernels.chunk_gradient_sum(net, x, y, np.arange(10), np.empty_like(net.params), ws)
    with pytest.raises(ValueError, match=message):
        kernels.run_steps(net, x, y, np.arange(20), 0, 2, 10, 0.5, 0.0, np.empty((2, net.params.size)), ws)
    with pytest.raises(ValueError, match=message):
        kernels.compiled_gradient_sum(net, x, y)


# ------------------------------------------------------------------ the BLAS binding (core.blas)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("trans_a, trans_b", [("N", "N"), ("T", "N"), ("N", "T"), ("T", "T")])
@pytest.mark.parametrize("m, n, k, pad", [(1, 1, 1, 0), (7, 3, 5, 2), (32, 30, 784, 0), (30, 784, 10, 3),
                                          (784, 30, 7, 25)])
def test_the_bound_gemm_multiplies_as_numpy_does(dtype, trans_a, trans_b, m, n, k, pad):
    """SciPy's ?gemm through the binding the kernels use (called by symbol, integers as 32 bits),
    against numpy's product on random operands: the shapes of the kernels' products among them,
    leading dimensions longer than the columns, both transposes, both dtypes."""
    rng = np.random.default_rng(m * n + k)
    op_a, op_b = rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)
    a = op_a.T.copy() if trans_a == "T" else op_a
    b = op_b.T.copy() if trans_b == "T" else op_b
    got = blas.product(a, b, trans_a, trans_b, pad)  # two calls, beta 0 then 1: 2 op(a) op(b)
    want = 2 * np.dot(op_a.astype(np.float64), op_b.astype(np.float64))
    assert got.dtype == dtype and got.shape == (m, n)
    tolerance = (1e-12 if dtype == np.float64 else 1e-5) * np.sqrt(k)
    assert np.max(np.abs(got - want)) <= tolerance * np.max(np.abs(want))


def test_the_binding_refuses_a_blas_it_cannot_call(monkeypatch):
    """The load-time checks refuse, in one line, a ?gemm declared with 64-bit integers (ILP64) and
    one whose products are wrong, instead of letting the kernels compute with them."""
    import ctypes

    import scipy.linalg.cython_blas

    make_capsule = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p)(
        ("PyCapsule_New", ctypes.pythonapi))
    ilp64 = b"void (char *, char *, long *, long *, long *, double *, double *, long *, double *, long *, " \
            b"double *, double *, long *)"
    monkeypatch.setitem(scipy.linalg.cython_blas.__pyx_capi__, "dgemm", make_capsule(1, ilp64, None))
    with pytest.raises(blas.BlasBindingError, match=r"^core.blas: scipy.linalg.cython_blas.dgemm is declared as "
                                                    r".*long \*.*not the LP64 signature[^\n]*$"):
        blas._check_signatures()
    monkeypatch.undo()
    blas._check_signatures()  # SciPy's own declaration passes
    monkeypatch.setattr(blas, "product", lambda a, b, *args, **kwargs: np.zeros((a.shape[0], b.shape[1])))
    with pytest.raises(blas.BlasBindingError, match=r"^core.blas: SciPy's dgemm called by symbol multiplied wrongly"):
        blas._check_products()


KERNEL = "import numba\n\n\n@numba.njit(cache=True)\ndef twice(x):\n    return 2 * x\n"


def _load_kernel(path, name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.twice


@pytest.mark.parametrize("damage", ["index", "data", "full disk"])
def test_a_damaged_or_full_kernel_cache_is_compiled_around(tmp_path, monkeypatch, damage):
    """numba raises on a truncated .nbi (UnpicklingError), a damaged .nbc, or a full disk; the kernels then
    compile again with one warning, and a damaged index is replaced by a good one."""
    import errno
    import warnings

    from numba.core import caching

    from core import kernel_cache

    monkeypatch.setattr(kernel_cache, "_said", set())
    kernel_cache.tolerate_damage()
    (tmp_path / "kern.py").write_text(KERNEL)
    assert _load_kernel(tmp_path / "kern.py", f"kern_a_{damage[0]}")(21) == 42  # compiled and cached
    cache = tmp_path / "__pycache__"
    (index,) = cache.glob("*.nbi")
    (data,) = cache.glob("*.nbc")
    if damage == "index":
        index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    elif damage == "data":
        data.write_bytes(b"\x80\x04not a pickle at all")
        index.touch()
    else:
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        for f in cache.iterdir():
            f.unlink()
        monkeypatch.setattr(caching.IndexDataCacheFile, "save", full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _load_kernel(tmp_path / "kern.py", f"kern_b_{damage[0]}")(21) == 42
    (warning,) = [w for w in caught if issubclass(w.category, kernel_cache.KernelCacheWarning)]
    expected = "cannot be cached in" if damage == "full disk" else "is damaged"
    assert expected in str(warning.message) and "\n" not in str(warning.message)
    assert damage != "full disk" or "(No space left on device)" in str(warning.message)
    if damage != "full disk":  # compiled again and cached in its place: the next process loads it, no warning
        monkeypatch.setattr(kernel_cache, "_said", set())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _load_kernel(tmp_path / "kern.py", f"kern_c_{damage[0]}")(21) == 42
        assert not [w for w in caught if issubclass(w.category, kernel_cache.KernelCacheWarning)]


def test_the_kernel_cache_is_its_owners_alone_or_not_used(tmp_path, monkeypatch):
    """Cached kernels are code: the shared folder is made 0700, and one that others can write is passed over,
    with one warning line, for the clone's own (numba's next locator)."""
    from core import kernel_cache, kernels

    monkeypatch.setattr(kernel_cache, "_said", set())
    monkeypatch.setenv(kernel_cache.KERNEL_CACHE, str(tmp_path / "cache"))
    kernel_cache.kernels_folder.cache_clear()
    try:
        kernel = kernels._chunk_sum.py_func
        locator = kernel_cache.SharedLocator.from_function(kernel, kernels.__file__)
        folder = kernel_cache.kernels_folder()
        assert locator.get_cache_path() == str(folder) and folder.parent == tmp_path / "cache"
        assert {oct(p.stat().st_mode & 0o777) for p in (folder, folder.parent)} == {"0o700"}
        assert kernel_cache.SharedLocator.from_function(np.sum, np.__file__) is None  # not core's: numba's own
        folder.chmod(0o777)
        with pytest.warns(kernel_cache.KernelCacheWarning, match="can be written by other users, so it is not used"):
            assert kernel_cache.SharedLocator.from_function(kernel, kernels.__file__) is None
    finally:
        kernel_cache.kernels_folder.cache_clear()
