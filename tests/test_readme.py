"""The README tells the truth: its keys exist, its bundled configs run, its Python snippet works."""

from __future__ import annotations

import re

import mlflow
import numpy as np
import pytest

from conftest import CONFIGS, ROOT
from jobs.cli import main
from jobs.config import KEYS, load_config
from jobs.data import load_dataset
from jobs.run import run_job

README = (ROOT / "README.md").read_text()


def test_the_keys_the_readme_lists_are_every_key():
    paragraph = README[README.index("Keys: `data`"):]
    paragraph = paragraph[: paragraph.index("\n\n")]
    while "(" in paragraph:  # the values are in parentheses, some nested: drop them from the inside out
        paragraph = re.sub(r"\([^()]*\)", "", paragraph)
    named = set(re.findall(r"`(\w+)`", paragraph))
    assert named == set(KEYS), named ^ set(KEYS)


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_bundled_config_runs_an_epoch(config):
    from jobs.config import replace
    from jobs.sweep import plan_from

    if config.startswith("sweep-"):  # a sweep: each of its trials
        configs = [replace(t.config, epochs=1, track=False) for t in plan_from(str(CONFIGS / config), [], None).trials]
    else:
        configs = [load_config(CONFIGS / config, ["epochs=1", "track=false"])]
    for cfg in configs:
        state = run_job(cfg, quiet=True).state
        assert state.epoch == 1 and np.all(np.isfinite(state.network.params))


def test_the_readme_python_snippet_runs(tracking_uri, capsys):
    assert main(["run", str(CONFIGS / "digits.yaml"), "epochs=1", "--quiet"]) == 0
    experiment = mlflow.get_experiment_by_name("digits") or mlflow.get_experiment_by_name("gradavg")
    (model,) = mlflow.search_logged_models(experiment_ids=[experiment.experiment_id], output_format="list")
    snippet = README[README.index("```python\n") + len("```python\n"):]
    snippet = snippet[: snippet.index("```")].replace("models:/m-...", f"models:/{model.model_id}")
    pixels = load_dataset("digits", validation_size=200).x_test
    scope = {"pixels": pixels}
    exec(compile(snippet.replace("model.predict(pixels)", "labels = model.predict(pixels)"), "README", "exec"),
         scope)
    assert scope["labels"].shape == (pixels.shape[0],) and set(scope["labels"]) <= set(range(10))


def test_ci_runs_the_readmes_test_command_and_every_tier():
    section = README[README.index("## Tests\n"):]
    command = section[section.index("```sh\n") + len("```sh\n"):].split("\n", 1)[0]
    assert command.endswith("pytest --all")  # CI runs every tier, not the fast one
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()
