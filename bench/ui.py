"""The MLflow UI as a user first sees gradavg's runs, in a real browser, with screenshots.

Trains a run and a sweep (with its best trial registered) into a new local store, starts
`mlflow ui` on it (127.0.0.1, a free port), drives a headless Chromium through the pages the
README describes, saves a screenshot of each, and checks that the first screen of each shows what
the README says it shows. Prints one line a page and exits 1 if any check fails.

Needs a browser, which the tests do not: `pip install playwright` and a Chromium (`apt-get install
chromium`; plain `chromium --headless --screenshot` never draws MLflow's charts, a driven browser
does):

    .venv/bin/pip install playwright && apt-get install chromium
    .venv/bin/python -m bench.ui [--out bench-results/ui] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = [str(ROOT / "configs" / "digits.yaml"), "epochs=8", "eta=6.0", "validation_size=300", "keep=best"]
SWEEP = [str(ROOT / "configs" / "digits.yaml"), "epochs=4", "eta=0.5,3.0,6.0", "validation_size=300", "keep=best",
         "--register", "digits-best"]
VIEWPORT = {"width": 1600, "height": 1000}
SETTLE_SECONDS = 6.0  # the UI draws its charts after its requests return: waited for in real time
# MLflow 3.17's UI opens an assistant panel on a first visit, over a third of the page: as a user who closed it
CLOSED_ASSISTANT = ("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                    "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")


@dataclass
class Page:
    name: str
    path: str  # from the UI's root
    shows: list[str]  # what its first screen shows, in this order
    hides: tuple[str, ...] = ()  # what it must not show
    image: bool = False  # an image in the run's description has loaded


def gradavg(args: list[str], store: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=store, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def pages(store: Path) -> list[Page]:
    """The pages to visit, from what the store holds."""
    from mlflow.tracking import MlflowClient

    from jobs.store import TRAINING_VIEW, model_version_path, run_path

    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "digits"]
    found = client.search_runs([experiment.experiment_id])
    run = next(r for r in found if r.info.run_name.startswith("digits epochs=8"))
    parent = next(r for r in found if "sweep_keys" in r.data.tags)
    trials = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    e, ml = experiment.experiment_id, TRAINING_VIEW
    page = run_path(e, run.info.run_id)
    ids = json.dumps([r.info.run_id for r in trials])
    return [
        Page("experiment", f"#/experiments/{e}?{ml}", ["Runs", "sweep of eta", run.info.run_name],
             ("Detect Issues", "Token Usage")),
        Page("run overview", page, ["Description", "FINISHED: test accuracy", "keep=best", "Metrics"], image=True),
        Page("model metrics", page.replace("?", "/model-metrics?"), ["accuracy", "validation", "cost"]),
        Page("artifacts", page.replace("?", "/artifacts?"), ["plots", "config.yaml", "weights.npz"]),
        Page("sweep parent", run_path(e, parent.info.run_id), ["sweep of eta", "A sweep of eta: 3 trials",
                                                                "Best: trial"], image=True),
        Page("compare trials", f"#/compare-runs?runs={ids}&experiments={json.dumps([e])}&{ml}",
             ["Parameters:", "eta", "Metrics:", "accuracy/validation"], ("run_name",)),
        Page("registered model", model_version_path("digits-best", "1"), ["The best trial", "kept_epoch",
                                                                           "validation_accuracy"],
             ("Evaluation runs", "Prompts")),
    ]


def check(tab, page: Page) -> list[str]:
    """What the page's first screen lacks or shows against ``page``; empty when it is as the README says."""
    text, problems, at = tab.inner_text("body"), [], 0
    for expected in page.shows:
        found = text.find(expected, at)
        if found < 0:
            problems.append(f"no {expected!r}" + (" after the text before it" if expected in text else ""))
            continue
        at = found
        box = tab.get_by_text(expected).first.bounding_box()
        if box is None or not 0 <= box["y"] < VIEWPORT["height"]:
            problems.append(f"{expected!r} is below the first screen")
    if page.image and not tab.evaluate(
            "() => [...document.images].some(i => i.src.includes('get-artifact') && i.naturalWidth)"):
        problems.append("the description's image did not load")
    return problems + [f"shows {hidden!r}" for hidden in page.hides if hidden in text]


def wait_for(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the MLflow UI did not answer at {url} in {seconds:.0f} s")


def main() -> int:
    from playwright.sync_api import sync_playwright

    from jobs.store import free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-results/ui", help="where the screenshots go")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gradavg-ui-") as folder:
        store = Path(folder)
        print("training a run and a sweep into a new store ...", file=sys.stderr)
        gradavg(["run", *RUN], store)
        gradavg(["sweep", *SWEEP], store)
        port = free_port()
        ui = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri",
                               f"sqlite:///{store / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=store, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        failed = 0
        try:
            wait_for(f"http://127.0.0.1:{port}/health")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                tab = browser.new_page(viewport=VIEWPORT)
                tab.add_init_script(CLOSED_ASSISTANT)
                for number, page in enumerate(pages(store), 1):
                    tab.goto(f"http://127.0.0.1:{port}/{page.path}")
                    time.sleep(SETTLE_SECONDS)
                    shot = out / f"{number}-{page.name.replace(' ', '-')}.png"
                    tab.screenshot(path=str(shot))
                    problems = check(tab, page)
                    failed += bool(problems)
                    print(f"{page.name:<18} {'ok' if not problems else 'FAILED: ' + '; '.join(problems):<60} {shot}")
                browser.close()
        finally:
            os.killpg(ui.pid, 15)
            ui.wait(timeout=30)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
