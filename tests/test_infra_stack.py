"""infra/local-up and infra/local-down really start, serve and stop the local stack, on loopback only."""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _get(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.read()


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _session_listeners(session_ids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, ip, port) of every listening TCP socket owned by a process of the given sessions."""
    found = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or conn.pid is None:
            continue
        try:
            sid = os.getsid(conn.pid)
        except ProcessLookupError:
            continue
        if sid in session_ids:
            found.append((conn.pid, conn.laddr.ip, conn.laddr.port))
    return found


def _session_alive(sid: int) -> list[int]:
    alive = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


@pytest.fixture()
def stack_env(tmp_path):
    """Environment for a private stack: its own home, free ports, a short Ray temp dir."""
    gcs, dashboard, client, agent, mlflow_port = _free_ports(5)
    ray_tmp = tempfile.mkdtemp(prefix="astr-", dir="/tmp")
    env = {k: v for k, v in os.environ.items()
           if k not in {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI"}}
    env.update(
        ASTROMER_HOME=str(tmp_path / "home"),
        ASTROMER_RAY_PORT=str(gcs), ASTROMER_RAY_DASHBOARD_PORT=str(dashboard),
        ASTROMER_RAY_CLIENT_PORT=str(client), ASTROMER_RAY_AGENT_PORT=str(agent),
        ASTROMER_MLFLOW_PORT=str(mlflow_port), ASTROMER_RAY_NUM_CPUS="1",
        ASTROMER_RAY_TEMP_DIR=ray_tmp, ASTROMER_PYTHON=sys.executable,
    )
    yield env
    subprocess.run([str(INFRA / "local-down")], env=env, cwd=ROOT, capture_output=True, timeout=120)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_local_down_stops_both_services_when_their_processes_are_reaped(stack_env):
    """Under an init that reaps exited processes (systemd, tini, docker --init), a service's session is
    empty once it has stopped, and ``ps -s`` then exits 1: local-down must go on to the next service."""
    stack = Path(stack_env["ASTROMER_HOME"]) / "stack"
    stack.mkdir(parents=True)
    services = {}
    for name in ("ray", "mlflow"):   # stand-ins: one process per session, matching the pid files' patterns
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", name],
                                start_new_session=True)
        # wait() reaps it the moment it exits, as such an init does
        threading.Thread(target=proc.wait, daemon=True).start()
        (stack / f"{name}.pid").write_text(str(proc.pid))
        services[name] = proc
    (stack / "env.sh").write_text("")
    try:
        down = subprocess.run([str(INFRA / "local-down")], env=stack_env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert down.returncode == 0, down.stdout + down.stderr
        assert "Ray head stopped" in down.stdout and "MLflow server stopped" in down.stdout, down.stdout
        assert all(proc.wait(timeout=10) is not None for proc in services.values())
        assert sorted(p.name for p in stack.iterdir()) == []
    finally:
        for proc in services.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("problem", ["ray port taken", "client port in worker range"])
def test_local_up_checks_every_port_before_starting_anything(stack_env, problem):
    """A Ray port that cannot be used is refused before the MLflow server starts, naming the setting."""
    env = dict(stack_env)
    holder = socket.socket()
    if problem == "ray port taken":
        holder.bind(("127.0.0.1", int(env["ASTROMER_RAY_DASHBOARD_PORT"])))
        holder.listen()
        setting, reason = "ASTROMER_RAY_DASHBOARD_PORT", "is taken"
    else:
        env["ASTROMER_RAY_CLIENT_PORT"] = "10021"
        setting, reason = "ASTROMER_RAY_CLIENT_PORT", "in Ray's worker port range 10002-19999"
    try:
        up = subprocess.run([str(INFRA / "local-up")], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    finally:
        holder.close()
    assert up.returncode == 1, up.stdout + up.stderr
    assert reason in up.stderr and f"(set {setting})" in up.stderr, up.stderr
    assert "starting" not in up.stdout, up.stdout
    stack = Path(env["ASTROMER_HOME"]) / "stack"
    assert not (stack / "mlflow.pid").exists() and not (stack / "ray.pid").exists()
    with pytest.raises(OSError):
        _get(f"http://127.0.0.1:{env['ASTROMER_MLFLOW_PORT']}/health")


def test_local_stack_starts_serves_on_loopback_and_stops(stack_env, ray_local):
    """``ray_local``: another Ray runs on the machine meanwhile, as the stack must allow."""
    env = stack_env
    up = subprocess.run([str(INFRA / "local-up")], env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=240)
    assert up.returncode == 0, up.stdout + up.stderr
    mlflow_url = f"http://127.0.0.1:{env['ASTROMER_MLFLOW_PORT']}"
    dashboard_url = f"http://127.0.0.1:{env['ASTROMER_RAY_DASHBOARD_PORT']}"
    assert f"export MLFLOW_TRACKING_URI={mlflow_url}" in up.stdout
    assert f"export RAY_ADDRESS=127.0.0.1:{env['ASTROMER_RAY_PORT']}" in up.stdout

    # Both serve; Ray's API answers only with the stack's token.
    stack = Path(env["ASTROMER_HOME"]) / "stack"
    token = (stack / "ray_auth_token").read_text().strip()
    assert (stack / "ray_auth_token").stat().st_mode & 0o077 == 0
    status, body = _get(f"{mlflow_url}/health")
    assert status == 200 and body.strip() == b"OK"
    status, body = _get(f"{dashboard_url}/api/version", token)
    assert status == 200 and json.loads(body)["ray_version"]
    status, body = _get(f"{dashboard_url}/api/jobs/", token)
    assert status == 200 and isinstance(json.loads(body), list)
    with pytest.raises(urllib.error.HTTPError) as refused:
        _get(f"{dashboard_url}/api/jobs/")
    assert refused.value.code in (401, 403)

    # Nothing of the stack listens beyond loopback; the configured ports are among its listeners.
    ray_sid = int((stack / "ray.pid").read_text())
    mlflow_sid = int((stack / "mlflow.pid").read_text())
    listeners = _session_listeners({ray_sid, mlflow_sid})
    ports = {port for _, _, port in listeners}
    for key in ("ASTROMER_RAY_PORT", "ASTROMER_RAY_DASHBOARD_PORT", "ASTROMER_MLFLOW_PORT"):
        assert int(env[key]) in ports, (key, listeners)
    exposed = [(pid, ip, port) for pid, ip, port in listeners if not _is_loopback(ip)]
    assert not exposed, f"listening beyond loopback: {exposed}"

    # A job submitted the way the docs say runs in the repository with the venv's python and logs to
    # the stack's MLflow server. Its tasks reach the head's state API (Ray Train's placement-group cleaner
    # asks it every second whether the controller lives) though another Ray runs on the machine.
    job_env = dict(env)
    for line in (stack / "env.sh").read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            job_env[key] = value
    code = ("import mlflow, os, sys; mlflow.set_experiment('stack-check'); "
            "run = mlflow.start_run(run_name='from-ray-job'); mlflow.log_param('cwd', os.getcwd()); "
            "mlflow.log_param('python', sys.executable); "
            "import ray; from ray.util.state import list_nodes; "
            "nodes = ray.get(ray.remote(lambda: len(list_nodes())).remote()); "
            "mlflow.log_param('nodes_seen_by_a_task', nodes); mlflow.end_run()")
    ray_cli = [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.argv[0]='ray'; main()"]
    job = subprocess.run(ray_cli + ["job", "submit", "--", "python", "-c", code], env=job_env, cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert job.returncode == 0, job.stdout + job.stderr
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name("stack-check")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["from-ray-job"]
    assert runs[0].data.params["cwd"] == str(ROOT)
    assert Path(runs[0].data.params["python"]).parent == Path(sys.executable).parent
    assert runs[0].data.params["nodes_seen_by_a_task"] == "1"

    # A job still running when the stack stops: like the project's jobs, it ends its MLflow run as KILLED
    # on SIGTERM (which ray.init() turns into SystemExit in a driver).
    in_flight = Path(env["ASTROMER_HOME"]) / "in_flight.py"
    in_flight.write_text(
        "import time\nimport mlflow\nimport ray\n\nray.init()\nmlflow.set_experiment('stack-check')\n"
        "mlflow.start_run(run_name='in-flight')\ntry:\n    time.sleep(600)\nexcept SystemExit:\n"
        "    mlflow.end_run(status='KILLED')\n    raise\n")
    job = subprocess.run(ray_cli + ["job", "submit", "--no-wait", "--submission-id", "in-flight", "--",
                                    "python", str(in_flight)],
                         env=job_env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert job.returncode == 0, job.stdout + job.stderr
    deadline = time.monotonic() + 180
    while not client.search_runs([experiment.experiment_id], "attributes.run_name = 'in-flight'"):
        assert time.monotonic() < deadline, "the in-flight job did not start its run"
        time.sleep(1)

    # Stop: the job is stopped through Ray's job API before the head (its run ends KILLED, not left
    # RUNNING), every process of both sessions ends, nothing answers, and a second stop is a no-op.
    down = subprocess.run([str(INFRA / "local-down")], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopping 1 Ray job(s) first" in down.stdout and "job in-flight ended (STOPPED)" in down.stdout, \
        down.stdout
    with sqlite3.connect(Path(env["ASTROMER_HOME"]) / "mlflow.db") as db:
        statuses = dict(db.execute("SELECT name, status FROM runs"))
    assert statuses == {"from-ray-job": "FINISHED", "in-flight": "KILLED"}, statuses
    time.sleep(0.5)
    assert _session_alive(ray_sid) == [] and _session_alive(mlflow_sid) == []
    with pytest.raises(OSError):
        _get(f"{mlflow_url}/health")
    with pytest.raises(OSError):
        _get(f"{dashboard_url}/api/version", token)
    again = subprocess.run([str(INFRA / "local-down")], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0 and "not running" in again.stdout
