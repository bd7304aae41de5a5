"""infra/check-ui opens a run's MLflow UI page in headless Chromium: the run is rendered and a PNG is saved.

Runs where a Chromium is installed (Debian: ``apt-get install -y chromium``); the rest of the infra tests do
not need one.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "infra"))
from check_ui import find_chromium, picture_summary  # noqa: E402

needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="no Chromium installed (apt-get install chromium)")


def test_a_missing_browser_is_named_without_a_usage_text():
    missing = subprocess.run([str(ROOT / "infra" / "check-ui"), "--tracking-uri", "http://127.0.0.1:9",
                              "--chromium", "no-such-chromium"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "usage:" not in missing.stderr
    assert "no Chromium found (looked for no-such-chromium)" in missing.stderr and "--chromium PATH" in missing.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(tmp_path):
    """A real MLflow server on SQLite, in its own session so that it and its workers stop together."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--serve-artifacts", "--artifacts-destination", str(tmp_path / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, 9)
                pytest.fail("MLflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
            time.sleep(1)
    yield url
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    log.close()


@needs_chromium
def test_check_ui_renders_the_run_and_saves_a_screenshot(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.create_experiment("ui-check")
    run = client.create_run(experiment, run_name="ui-check-run-7f3a")
    for step, loss in enumerate([1.0, 0.7, 0.5, 0.42]):
        client.log_metric(run.info.run_id, "val_rmse", loss, step=step)
    client.log_param(run.info.run_id, "preset", "tiny")
    client.set_terminated(run.info.run_id)

    out = tmp_path / "run.png"
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server)
    done = subprocess.run([str(ROOT / "infra" / "check-ui"), "--out", str(out), "--wait-ms", "10000"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "run name found" in done.stdout and run.info.run_id in done.stdout
    size, colours = picture_summary(out)
    assert size == (1400, 900) and colours >= 16

    # A run id that does not exist is an error, not a screenshot of an error page.
    missing = subprocess.run([str(ROOT / "infra" / "check-ui"), "--run-id", "0" * 32, "--out",
                              str(tmp_path / "missing.png")], env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and not (tmp_path / "missing.png").exists()
