"""Pretraining across nodes: a real multi-node Ray cluster (Ray's own ``cluster_utils``: one raylet per node, all
on this machine) with one training worker per node, as on GPU nodes in production. The job runs as its users
run it, ``python jobs/pretrain.py`` against the cluster's address. A worker node is lost mid-run (its raylet
and every process on it end, as when a spot instance is reclaimed) and a fresh node joins: the run goes on
from the last checkpoint on the nodes that remain."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from astromer import registry
from astromer.train import TrainConfig
from mlflow.tracking import MlflowClient
from test_data import write_lake
from test_pretrain import _common, _history, _registered_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 40, 4     # a margin of 36 steps between the first checkpoint and the run's end


def _raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def _node_of(pid: int, nodes: dict) -> str | None:
    """The cluster node whose raylet started process ``pid`` (Ray's workers are its raylet's children)."""
    raylets = {_raylet_pid(node): name for name, node in nodes.items() if node.all_processes}
    for parent in psutil.Process(pid).parents():
        if parent.pid in raylets:
            return raylets[parent.pid]
    return None


def _pids(folder: Path, rank: int) -> list[int]:
    path = folder / f"rank{rank}.pid"
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.fixture()
def cluster():
    from ray.cluster_utils import Cluster

    # The head runs the driver, Ray Data's tasks and Ray Train's controller; a worker asks for 1.5 CPUs, so
    # only the two worker nodes can hold one each.
    # The dashboard serves the state API through which Ray Train watches its controller, as on a real head.
    nodes = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": _common._free_port()})
    try:
        yield nodes
    finally:
        nodes.shutdown()


def _start_job(cluster, lake: Path, home: Path, run_name: str, tracking_uri: str, pids: Path):
    command = [sys.executable, str(ROOT / "jobs" / "pretrain.py"), "--lake", str(lake), "--corpus", "unit",
               "--preset", "tiny", "--dropout", "0.1", "--batch-size", "8", "--num-workers", "2",
               "--cpus-per-worker", "1.5", "--data-cpus", "0.25", "--warmup-steps", "2", "--lr", "3e-3",
               "--log-every", "1", "--checkpoint-every", str(EVERY), "--max-steps", str(STEPS), "--epochs", "5",
               "--reproducible", "--system-metrics-every", "1", "--run-name", run_name, "--pid-dir", str(pids)]
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "ASTROMER_HOME": str(home),
           "MLFLOW_TRACKING_URI": tracking_uri}
    with open(home.parent / f"{run_name}.log", "w") as log:   # a file: a full pipe would block the job
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finished_run(client, job, run_name: str, home: Path):
    job.wait(timeout=600)
    assert job.returncode == 0, (home.parent / f"{run_name}.log").read_text()[-4000:]
    run = client.get_run(registry.find_run("astromer-pretrain", run_name))
    assert run.info.status == "FINISHED"
    return run


def _last_losses(client, run) -> dict[int, float]:
    """Each step's loss as the run ended (a step trained again after a resume logs a second value)."""
    return dict(_history(client, run.info.run_id, "train_loss"))


def test_a_run_spans_nodes_and_survives_losing_one(cluster, mlflow_sqlite, tmp_path):
    lake = write_lake(tmp_path / "lake", 300, seed=3)       # one pass = 15 steps of 2 workers x batch 8
    home = tmp_path / "home"
    client = MlflowClient(tracking_uri=mlflow_sqlite)
    # each node on an address of its own (Ray Train tells nodes apart by address: local ranks, node ranks)
    nodes = {"a": cluster.add_node(num_cpus=2, node_ip_address="127.0.0.2"),
             "b": cluster.add_node(num_cpus=2, node_ip_address="127.0.0.3")}
    cluster.wait_for_nodes()

    # a reproducible run straight through, the reference
    straight = _finished_run(client, _start_job(cluster, lake, home, "straight", mlflow_sqlite, tmp_path / "p0"),
                             "straight", home)
    keys = set(straight.data.metrics)   # each node's sampler logs under its own prefix: the UI shows both
    assert {"system/node_0/cpu_utilization_percentage", "system/node_1/cpu_utilization_percentage"} <= keys
    assert "system/cpu_utilization_percentage" not in keys

    # the same run, losing the node of rank 1 after the first checkpoint
    pids = tmp_path / "p1"
    job = _start_job(cluster, lake, home, "lose-a-node", mlflow_sqlite, pids)
    try:
        config = TrainConfig(run_name="lose-a-node", storage_path=str(home / "ray_results"))
        deadline = time.monotonic() + 300
        last_checkpoint = 0
        while job.poll() is None and time.monotonic() < deadline and last_checkpoint < EVERY:
            time.sleep(0.05)
            last_checkpoint = _registered_checkpoint(config) or 0
        assert job.poll() is None, "the job ended before its first checkpoint"
        assert last_checkpoint >= EVERY, "no checkpoint within 300 s"
        hosts = {rank: _node_of(_pids(pids, rank)[-1], nodes) for rank in (0, 1)}
        assert sorted(hosts.values()) == ["a", "b"], hosts        # one rank on each worker node
        lost = hosts[1]
        cluster.remove_node(nodes.pop(lost), allow_graceful=False)  # SIGKILL of its raylet, workers and all
        assert job.poll() is None, "the job ended before the node was lost"
        last_checkpoint = _registered_checkpoint(config)
        # the replacement joins after the loss: Ray Train waits for the resources it needs
        nodes["c"] = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.4")
        while job.poll() is None and time.monotonic() < deadline + 300 and len(_pids(pids, 1)) < 2:
            time.sleep(0.1)
        moved_to = _node_of(_pids(pids, 1)[-1], nodes) if job.poll() is None else None
        run = _finished_run(client, job, "lose-a-node", home)
    finally:
        if job.poll() is None:
            job.kill()
    (resumed,) = _history(client, run.info.run_id, "resumed_from_step")
    assert resumed[1] >= last_checkpoint >= EVERY and resumed[1] % EVERY == 0
    # the restarted rank 1 is a new process on a node that survived
    assert len(_pids(pids, 1)) == 2 and moved_to in ({"a", "b", "c"} - {lost}), moved_to
    # and it trained on as if nothing had happened: the same windows, masks and dropout on the new nodes
    assert _last_losses(client, run) == _last_losses(client, straight)
    assert len(_last_losses(client, run)) == STEPS
    assert run.data.metrics["final_val_rmse"] == straight.data.metrics["final_val_rmse"]
    assert client.get_model_version_by_alias("astromer2-unit", "candidate").run_id == run.info.run_id
