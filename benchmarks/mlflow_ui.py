"""What a person sees in `mlflow ui` after a study: screenshots taken with headless Chromium.

A documented check, run by hand (it needs Debian's ``chromium``: ``apt-get install chromium``)::

    python -m sweeper.run -m hydra.sweeper.register=true    # a study, its model registered
    python -m benchmarks.mlflow_ui                           # -> docs/mlflow_ui_*.png

It starts ``mlflow ui`` on the study's store (127.0.0.1, a free port), opens the experiment,
the study's parent run and the registered model as a browser would, and saves one PNG each:

- ``mlflow_ui_runs.png``: the experiment on its training runs (the model-training pages, not
  MLflow 3's GenAI overview), the study as a parent run with its trials under it;
- ``mlflow_ui_study.png``: the parent run: the recommendation as its description, its trials
  by name (``t007-resnet18-u5``), its tags (``recommended.*``);
- ``mlflow_ui_model.png``: the registered model's versions with their tags.

Look at them: the check is that they show those things. ``--outputs`` (default
``$SWEEPER_OUTPUTS`` or ``outputs``) is the study's outputs folder, ``--study`` the study
(default: the latest), ``--docs`` where the PNGs go.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

from sweeper.tracking import Kind, Tag

WINDOW = "1500,950"
# MLflow 3.17's UI picks GenAI or model-training pages by a switch it remembers per browser
# (default GenAI); this URL parameter sets it to model training.
RUNS = "workflowType=machine_learning"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read(100)
            return
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"mlflow ui did not start at {url}") from None
            time.sleep(1)


def screenshot(browser: str, url: str, png: Path, window: str = WINDOW,
               wait_ms: int = 20000) -> None:
    """``url`` rendered by headless Chromium (JavaScript given ``wait_ms`` of virtual time)."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--user-data-dir={profile}",
                        f"--window-size={window}", f"--virtual-time-budget={wait_ms}",
                        f"--screenshot={png}", url],
                       check=True, capture_output=True, timeout=180)
    from PIL import Image

    with Image.open(png) as image:  # a palette of 128 colours: a third of the size, same look
        small = image.convert("RGB").quantize(colors=128)
    small.save(png, optimize=True)
    print(f"{png}  <- {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mlflow_ui", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outputs", default=os.environ.get("SWEEPER_OUTPUTS", "outputs"))
    parser.add_argument("--study", default=None)
    parser.add_argument("--experiment", default="sweeper")
    parser.add_argument("--docs", default=str(Path(__file__).resolve().parent.parent / "docs"))
    args = parser.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("Needs Chromium: apt-get install chromium", file=sys.stderr)
        return 1
    store = f"sqlite:///{Path(args.outputs).resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        print(f"No experiment {args.experiment!r} in {store}: run a study first.", file=sys.stderr)
        return 1
    query = f"tags.`{Tag.KIND}` = '{Kind.STUDY}'"
    if args.study:
        query += f" and tags.`{Tag.STUDY}` = '{args.study}'"
    parents = client.search_runs([exp.experiment_id], query, order_by=["start_time DESC"],
                                 max_results=1)
    if not parents:
        print(f"No study in experiment {args.experiment!r}: run one first.", file=sys.stderr)
        return 1
    parent = parents[0]
    study = parent.data.tags.get(Tag.STUDY, parent.info.run_name)
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", store, "--host",
                               "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{base}/health", server)
        screenshot(browser, f"{base}/#/experiments/{exp.experiment_id}?{RUNS}",
                   docs / "mlflow_ui_runs.png")
        screenshot(browser, f"{base}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}"
                   f"?{RUNS}", docs / "mlflow_ui_study.png", window="1500,1400")  # to its description
        if client.search_registered_models(f"name = '{study}'"):
            screenshot(browser, f"{base}/#/models/{study}?{RUNS}", docs / "mlflow_ui_model.png",
                       window="1500,700")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
