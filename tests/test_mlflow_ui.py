"""The MLflow UI, in a real browser: a tiny search, ``mlflow ui`` on a free localhost port, and
headless Chromium (Debian's ``chromium`` package, driven by Playwright) checking what a user
would look for: the URL the search prints opens the Model-training workspace, the runs (child
runs nested under the search) with the data's name in the Dataset column, the search's live
counts, a trial's params and metrics, and the best checkpoint among its artifacts.

Screenshots are written to the test's tmp folder; set ``UI_SCREENSHOT_DIR=docs`` to refresh the
README's ``docs/mlflow-ui.png`` as well. MLflow's UI is a React app: every step waits for text
or elements to appear, never for a fixed time.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from trainables.data.parquet import write_parquet
from tuner.search import main

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# what a root user on a headless CI machine needs (Playwright adds --headless itself)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SEARCH = "ui-e2e"
DATA_NAME = "tiny-mosi"  # the data folder: the dataset's name in the Dataset column
TIMEOUT_MS = 90_000  # per step; generous for a loaded CI machine (a page shows in seconds)


@pytest.fixture(scope="module")
def tracked_search(tmp_path_factory, small_data, ray_local):
    """A finished 3-trial search: its folder, and the MLflow ids and names the UI must show."""
    root = tmp_path_factory.mktemp("ui")
    data_dir = write_parquet(small_data, root / DATA_NAME)
    space = {
        "name": "tiny",
        "backbones": ["ef_lstm"],
        "regularisers": ["none", "mdm"],
        "data": str(data_dir),
        "ranges": {"lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
                   "regulariser.estimator": ["kl", "w"]},
        "fixed": {"batch_size": 32, "regulariser.unroll": 1, "backbone.hidden": 8},
        "start_points": [{"regulariser": "none", "lr": 0.005},
                         {"regulariser": "mdm", "lr": 0.005, "regulariser.estimator": "kl"}],
        "search": {"sampler": "random", "pruner": "none", "num_samples": 3, "max_epochs": 2,
                   "seed": 0, "max_concurrent": 2},
        "resources": {"cpu": 1},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(space))
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.chdir(root)
        assert main(["--space", "tiny.yaml", "--name", SEARCH]) == 0
    # the runs table's URL, as printed before the first trial
    url = next(line.split()[-1] for line in printed.getvalue().splitlines()
               if line.strip().startswith("then open"))
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("run_kind") == "search")
    children = [r for r in runs if r.data.tags.get("run_kind") == "trial"]
    best = next(r for r in children if r.info.run_id == parent.data.tags["best_run_id"])
    assert len(children) == 3
    return {"root": root, "experiment_id": experiment.experiment_id, "parent": parent,
            "children": children, "best": best, "url": url}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_ui(tracked_search):
    """``mlflow ui`` against the search's SQLite store, on a free localhost port; its base URL.

    The experiment's artifact location is an absolute ``file://`` folder (see
    ``tuner.tracking.Tracker``), so the server lists and serves the artifacts from there."""
    root = tracked_search["root"]
    port = _free_port()
    log = open(root / "mlflow-ui.log", "wb")
    # its own process group: `mlflow ui` runs uvicorn as a child process, and both must go
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
         f"sqlite:///{root / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # its start takes ~10 s; minutes under heavy load
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow ui exited with {server.returncode}: "
                            f"{(root / 'mlflow-ui.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow ui did not answer on /health within 300 s")
            time.sleep(0.25)
        yield base
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
        log.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        # `make test` installs it as root or through sudo; only without either is it missing
        pytest.skip(f"no chromium at {CHROMIUM}: `make test` could not install Debian's chromium "
                    "(needs root or passwordless sudo: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()


def _close_assistant(page) -> None:
    """The 3.x UI opens an "MLflow Assistant" side panel on a first visit; close it."""
    close = page.get_by_role("button", name="Close", exact=True)
    try:
        close.click(timeout=3000)
    except Exception:  # playwright TimeoutError: no panel this time
        pass


def _table_row(page, run_name: str) -> str:
    """The text of a run's row in the runs table (AG Grid splits a row into a pinned and a
    scrolling part, joined again by their row index)."""
    name_row = page.locator("[role=row]").filter(
        has=page.get_by_role("link", name=run_name, exact=True)).first
    index = name_row.get_attribute("row-index")
    return " | ".join(page.locator(f'[role=row][row-index="{index}"]').all_inner_texts())


def _screenshot(page, tmp_path: Path, name: str, height: int | None = None) -> Path:
    path = tmp_path / name
    clip = {"x": 0, "y": 0, "width": 1280, "height": height} if height else None
    page.screenshot(path=str(path), clip=clip)
    target = os.environ.get("UI_SCREENSHOT_DIR")
    if target and name == "mlflow-ui.png":
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)
    return path


def test_runs_table_shows_every_trial_under_its_search(tracked_search, mlflow_ui, page, tmp_path):
    parent, children = tracked_search["parent"], tracked_search["children"]
    # the URL `python -m tuner.search` printed (for port 5000) opens the Model-training
    # workspace: its runs table and sidebar (Runs, Models, Traces), not the GenAI one's
    # (Overview, Sessions, Judges, ...), which a plain experiment URL opens in a fresh browser
    printed = tracked_search["url"]
    assert printed.startswith("http://127.0.0.1:5000/#/") and printed.endswith(
        "?workflowType=machine_learning")
    page.goto(printed.replace("http://127.0.0.1:5000", mlflow_ui))
    parent_row = page.locator("[role=row]", has_text=SEARCH)
    parent_row.first.wait_for()
    _close_assistant(page)
    page.get_by_text(f"{len(children) + 1} matching runs").wait_for()
    assert page.get_by_role("link", name="Runs", exact=True).count() >= 1
    assert page.get_by_text("Judges", exact=True).count() == 0
    # the Dataset column (shown without any configuration) names the data
    page.get_by_role("columnheader", name="Dataset").first.wait_for()
    assert f"{DATA_NAME} (" in _table_row(page, SEARCH)

    # child runs are nested under the search's run: expand it
    parent_row.first.locator("button").first.click()
    for child in children:
        page.get_by_role("link", name=child.info.run_name, exact=True).wait_for()

    # show the selection metric, the parent's live counts and the status tag as columns
    page.get_by_role("button", name="Columns").click()
    tree = page.locator(".du-bois-light-tree-title")
    # (Source and Models off: room for the rest; the Dataset column stays)
    for column in ("Source", "Models", "best_valid_mae", "trials_completed", "trials_pruned",
                   "status"):
        tree.get_by_text(column, exact=True).first.click()
    page.keyboard.press("Escape")
    page.get_by_role("columnheader", name="best_valid_mae").first.wait_for()
    search_row = _table_row(page, SEARCH)  # the search's best, logged on its parent run
    assert f"{parent.data.metrics['best_valid_mae']:g}" in search_row, search_row
    for child in children:
        text = _table_row(page, child.info.run_name)
        assert f"{child.data.metrics['best_valid_mae']:g}" in text, text
        assert child.data.tags["status"] in text, text
    page.get_by_role("button", name="Toggle sidebar").click()
    shot = _screenshot(page, tmp_path, "mlflow-ui.png", height=400)
    assert shot.stat().st_size > 10_000

    # the search's own run: its live counts (kept while it ran, final at its end)
    page.goto(f"{mlflow_ui}/#/experiments/{tracked_search['experiment_id']}/runs/"
              f"{parent.info.run_id}?workflowType=machine_learning")
    for name, value in (("trials_completed", 3), ("trials_pruned", 0), ("trials_failed", 0),
                        ("best_so_far", parent.data.metrics["best_valid_mae"])):
        cell = page.locator("[role=cell]").filter(has=page.get_by_text(name, exact=True))
        line = page.locator("[role=row]").filter(has=cell).first
        line.wait_for()
        assert f"{value:g}" in line.inner_text(), (name, line.inner_text())
        assert parent.data.metrics[name] == pytest.approx(value)


def test_trial_page_shows_params_and_metrics(tracked_search, mlflow_ui, page, tmp_path):
    best = tracked_search["best"]
    page.goto(f"{mlflow_ui}/#/experiments/{tracked_search['experiment_id']}/runs/"
              f"{best.info.run_id}")
    page.get_by_role("heading", name=best.info.run_name).or_(
        page.get_by_text(best.info.run_name, exact=True)).first.wait_for()
    _close_assistant(page)

    def row(name: str):
        cell = page.locator("[role=cell]").filter(has=page.get_by_text(name, exact=True))
        line = page.locator("[role=row]").filter(has=cell)
        line.first.wait_for()
        return line.first.inner_text()

    for param in ("lr", "regulariser", "backbone.hidden"):
        assert best.data.params[param] in row(param), param
    for metric in ("best_valid_mae", "test_mae"):
        assert f"{best.data.metrics[metric]:g}" in row(metric), metric
    # the parent link and the registered model version of the best checkpoint
    page.get_by_role("link", name=SEARCH, exact=True).first.wait_for()
    page.get_by_text("tiny-best").first.wait_for()  # "tiny-best v1"
    _screenshot(page, tmp_path, "mlflow-ui-trial.png")


def test_best_checkpoint_is_listed_in_the_artifacts(tracked_search, mlflow_ui, page, tmp_path):
    experiment = tracked_search["experiment_id"]
    best, parent = tracked_search["best"], tracked_search["parent"]
    page.goto(f"{mlflow_ui}/#/experiments/{experiment}/runs/{best.info.run_id}/artifacts")
    folder = page.get_by_text("best_checkpoint", exact=True).first
    folder.wait_for()
    _close_assistant(page)
    folder.click()
    page.get_by_text("best.pt", exact=True).first.wait_for()
    _screenshot(page, tmp_path, "mlflow-ui-artifacts.png")

    # the search's own run: the checkpoint too, and the space file, whose text the server serves
    page.goto(f"{mlflow_ui}/#/experiments/{experiment}/runs/{parent.info.run_id}/artifacts")
    page.get_by_text("best_checkpoint", exact=True).first.wait_for()
    page.get_by_text("space.yaml", exact=True).first.click()
    page.get_by_text("regulariser.estimator").first.wait_for()
