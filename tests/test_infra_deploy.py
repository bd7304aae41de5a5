"""The deployment files parse, name jobs and images that exist in this repository, install the CUDA build of
torch 2.13.0, and keep services on loopback unless a network is what they are for."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
IMAGE_WORKDIR = "/opt/astromer"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def built_image() -> str:
    """The tag infra/build-image gives the image of infra/Dockerfile."""
    match = re.search(r'IMAGE="\$\{IMAGE:-([^}]+)\}"', (INFRA / "build-image").read_text())
    assert match, "infra/build-image must set a default IMAGE tag"
    return match.group(1)


def script_in_repo(command: str, workdir: str = IMAGE_WORKDIR) -> Path:
    """The repository file a `python SCRIPT ...` command runs (absolute paths inside the image map back)."""
    words = shlex.split(command)
    assert words[0] == "python", command
    script = words[1]
    if script.startswith(workdir + "/"):
        script = script[len(workdir) + 1:]
    path = ROOT / script
    assert path.is_file(), f"{command!r} runs {script}, which is not in the repository"
    return path


def copied_folders(instructions) -> set[str]:
    folders = set()
    for word, rest in instructions:
        if word == "COPY":
            *sources, _ = rest.split()
            folders.update(s.rstrip("/") for s in sources if not s.startswith("--"))
    return folders


def test_dockerfile_installs_cuda_torch_2_13_and_the_repository():
    instructions = dockerfile_instructions(INFRA / "Dockerfile")
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert froms == ["${CUDA_BASE}"] and args["CUDA_BASE"].startswith("nvidia/cuda:")
    assert args["TORCH_VERSION"] == "2.13.0"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d{3}", args["TORCH_INDEX_URL"])
    runs = [rest for word, rest in instructions if word == "RUN"]
    torch_install = [r for r in runs if 'torch==${TORCH_VERSION}' in r]
    assert torch_install and '--index-url "${TORCH_INDEX_URL}"' in torch_install[0]
    assert "torch.version.cuda" in torch_install[0]          # the build fails on a CPU-only wheel
    # torch is installed before the package (whose pin it then satisfies), and the package from the repo
    package = next(i for i, r in enumerate(runs) if "pip install -e ." in r)
    assert runs.index(torch_install[0]) < package
    assert ("WORKDIR", IMAGE_WORKDIR) in instructions
    copied = copied_folders(instructions)
    assert {"pyproject.toml", "setup.py", "platform", "jobs", "ingest"} <= copied
    # the compiled kernels are built in the image (and a host's build is not copied in)
    assert "gcc" in runs[0] and "python3-dev" in runs[0] and "_kernels" in runs[package]
    for folder in copied:
        assert (ROOT / folder).exists(), f"Dockerfile copies {folder}, which is not in the repository"
    assert any(word == "USER" and rest != "root" for word, rest in instructions)
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".astromer", ".git"} <= set(ignore)


def test_cluster_launcher_runs_the_repository_image_and_pretrain_job():
    config = yaml.safe_load((INFRA / "cluster.yaml").read_text())
    # Ray's own schema of cluster-launcher files (no unknown keys, right types)
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["docker"]["image"] == built_image()
    assert "--gpus all" in config["docker"]["worker_run_options"]
    nodes = config["available_node_types"]
    assert config["head_node_type"] in nodes
    gpu_types = [name for name, node in nodes.items() if node.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu_types and all(nodes[n]["max_workers"] >= 1 for n in gpu_types)
    assert nodes[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    # the repository goes to the nodes and is installed there; the head checks that the job starts
    assert "." in config["file_mounts"].values()
    assert any("pip install" in c and "-e" in c for c in config["setup_commands"])
    job_commands = [c.split("&&")[-1].split(">")[0].strip() for c in config["head_setup_commands"]]
    assert any(script_in_repo(c).name == "pretrain.py" for c in job_commands if c.startswith("python"))
    # the head's dashboard (job server) stays on the head's loopback: reach it with `ray dashboard`
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--head" in head_start and "$RAY_HEAD_IP" in " ".join(config["worker_start_ray_commands"])


def test_kuberay_rayjob_runs_pretrain_on_gpu_workers_with_the_repository_image():
    job = yaml.safe_load((INFRA / "kuberay" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert script_in_repo(spec["entrypoint"]) == ROOT / "jobs" / "pretrain.py"
    # every flag of the entrypoint is one jobs/pretrain.py knows (its parser lives in jobs/_common.py)
    from _common import build_parser

    parser = build_parser("pretrain")
    parser.parse_args(shlex.split(spec["entrypoint"])[2:])
    assert "--use-gpu" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    images = [c["image"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in cluster["workerGroupSpecs"]:
        containers = group["template"]["spec"]["containers"]
        images += [c["image"] for c in containers]
        assert any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in containers)
        assert group["rayStartParams"]["num-gpus"] == "1"
    assert set(images) == {built_image()}
    # nothing leaves the Kubernetes cluster: the head service is internal only
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http://") and ".svc" in env["MLFLOW_TRACKING_URI"]


@pytest.fixture(autouse=True)
def _jobs_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "jobs"))


def test_mlflow_server_config_uses_postgres_and_object_store_on_loopback(tmp_path):
    compose = yaml.safe_load((INFRA / "mlflow" / "compose.yaml").read_text())
    mlflow = compose["services"]["mlflow"]
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert all(str(p).startswith("127.0.0.1:") for p in mlflow["ports"])
    for name, service in compose["services"].items():
        if name != "mlflow":
            assert "ports" not in service, f"{name} must not be published on the host"
    assert mlflow["build"] == "." and (INFRA / "mlflow" / "Dockerfile").is_file()
    assert "psycopg2" in (INFRA / "mlflow" / "Dockerfile").read_text()
    example = dict(line.split("=", 1) for line in (INFRA / "mlflow" / "mlflow.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["MLFLOW_HOST"] == "127.0.0.1"

    start = INFRA / "mlflow" / "start-server"
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    good = dict(base, MLFLOW_BACKEND_STORE_URI="postgresql://mlflow:s3cret@db.internal:5432/mlflow",
                MLFLOW_ARTIFACTS_DESTINATION="s3://bucket/artifacts")
    shown = subprocess.run([str(start), "--print"], env=good, capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    words = shlex.split(shown.stdout)
    assert words[:2] == ["mlflow", "server"]
    assert words[words.index("--host") + 1] == "127.0.0.1"          # loopback unless configured
    assert words[words.index("--artifacts-destination") + 1] == "s3://bucket/artifacts"
    assert "--serve-artifacts" in words
    assert "s3cret" not in shown.stdout and "postgresql://mlflow:***@db.internal" in shown.stdout
    # a local store is refused with a reason, and a missing setting is named
    sqlite = dict(good, MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp_path}/m.db")
    refused = subprocess.run([str(start), "--print"], env=sqlite, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "postgresql://" in refused.stderr
    missing = subprocess.run([str(start), "--print"], env=base, capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0 and "MLFLOW_BACKEND_STORE_URI" in missing.stderr


def test_local_stack_defaults_to_loopback():
    stack = (INFRA / "_stack.sh").read_text()
    assert 'BIND_HOST="${ASTROMER_BIND_HOST:-127.0.0.1}"' in stack
    up = (INFRA / "local-up").read_text()
    assert '--host "$BIND_HOST"' in up and "--dashboard-host" in up
    for script in ("local-up", "local-down", "build-image", "mlflow/start-server"):
        assert os.access(INFRA / script, os.X_OK), f"infra/{script} must be executable"
