"""The book's recipe learns: held to a stated accuracy in a stated number of epochs."""

from core import Network
from jobs.backends import LocalBackend
from jobs.config import load_config
from jobs.data import load_dataset
from jobs.train import train


def test_chapter_1_recipe_reaches_93_percent_on_digits_in_10_epochs():
    """[64, 30, 10], quadratic cost, η = 3.0, mini-batch 10, standard init; test set: a held-out fifth."""
    cfg = load_config(None, ["data=digits", "sizes=[64,30,10]", "eta=3.0", "batch_size=10", "epochs=10",
                             "init=standard", "cost=quadratic"])
    data = load_dataset("digits")
    assert data.x_test.shape[0] == 1797 // 5
    state = train(cfg, data, LocalBackend(cfg.chunk_size, threads=1))
    assert state.history[-1].test_accuracy >= 0.93
    assert state.history[-1].train_cost < state.history[0].train_cost
    untrained = Network.create(cfg.sizes, seed=cfg.seed)
    assert untrained.evaluate(data.x_test, data.y_test)[1] < 0.3
