"""The whole platform on the embedded defaults, stage by stage, with the commands you would type.

    python jobs/quickstart.py                      # synthetic survey, 3 to 6 minutes on 2 cores
    python jobs/quickstart.py --shared ../shared   # also ingest the real MACHO, OGLE-IV, ASAS and Stripe 82 sets
    python jobs/quickstart.py --small              # a reduced run (a couple of minutes; used by the tests)

Stages (each one is an ordinary job run as a subprocess of this Python; every command is printed first):

1. ingest    ingest/run.py: a simulated MACHO-like survey (and the real sets with --shared) -> the lake
2. pretrain  jobs/pretrain.py: a small Astromer 2 on local Ray, tracked in MLflow, registered as
             astromer2-<corpus> (alias `candidate`)
3. embed     jobs/embed.py: every curve of the survey -> embeddings/ in the lake
4. classify  jobs/classify.py: the paper's samples-per-class protocol on the synthetic labels, against
             light-curve features + random forest and a randomly initialised encoder
5. report    the model against the reconstruction baselines, the results table, two DuckDB queries over the
             lake, where the PNGs are (the pretraining ones fetched from MLflow), how to open MLflow

Everything lives under ASTROMER_HOME (default ./.astromer). Set MLFLOW_TRACKING_URI and RAY_ADDRESS (see
infra/local-up) and the same stages use a tracking server and a running Ray cluster instead.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The real sets under the shared data folder: (survey reader, folder, dataset name in jobs/classify.py)
REAL_SETS = (
    ("macho", "macho_sample", None),
    ("ogle", "ogle4_lmc_cepheids", "ogle-modes"),
    ("asas", "asas_richards2012", "asas"),
    ("sdss-stripe82", "sdss_stripe82_rrlyrae", "stripe82"),
)


@dataclass
class Plan:
    """How big each stage is: the default run and the reduced one (--small)."""

    n_curves: int
    years: float                     # survey length: fewer years, shorter curves, a faster demo
    preset: str
    window_length: int
    max_steps: int
    batch_size: int
    samples_per_class: tuple[int, ...]
    folds: int
    test_per_class: int
    max_epochs: int
    patience: int
    real_classify: tuple[str, ...]   # datasets classified too when --shared is given

    @classmethod
    def default(cls) -> Plan:
        return cls(n_curves=1000, years=4, preset="tiny", window_length=200, max_steps=300, batch_size=32,
                   samples_per_class=(20, 100, 500), folds=3, test_per_class=200, max_epochs=100, patience=10,
                   real_classify=("stripe82",))

    @classmethod
    def small(cls) -> Plan:
        return cls(n_curves=150, years=2, preset="tiny", window_length=64, max_steps=30, batch_size=16,
                   samples_per_class=(20,), folds=2, test_per_class=20, max_epochs=30, patience=5,
                   real_classify=())


class StageFailed(RuntimeError):
    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 96 - len(text)), flush=True)


def shown(cmd: list[str]) -> str:
    """The command as a newcomer would type it (the venv's python shown by its path relative to the repo)."""
    exe = Path(cmd[0])
    try:
        first = str(exe.relative_to(ROOT)) if exe.is_absolute() else cmd[0]
    except ValueError:
        first = "python" if exe == Path(sys.executable) else cmd[0]
    return shlex.join([first, *cmd[1:]])


# Ray gives a starting node a fixed 30 s to register; on an overloaded machine that can run out before the
# job did anything. Such a start is retried once instead of failing the whole demo.
RAY_START_TIMEOUT = "The current node timed out during startup"


def run(stage: str, cmd: list[str], env: dict, log_dir: Path) -> str:
    """Run one job (retrying once when only Ray's start-up timed out); returns its output."""
    try:
        return run_once(stage, cmd, env, log_dir)
    except StageFailed as exc:
        if RAY_START_TIMEOUT not in exc.output:
            raise
        print(f"  (Ray did not start in time on this busy machine: running {stage} once more)", flush=True)
        return run_once(stage, cmd, env, log_dir)


def run_once(stage: str, cmd: list[str], env: dict, log_dir: Path) -> str:
    """Run one job, streaming its output (indented) and keeping it in LOG_DIR/<stage>.log; returns the output."""
    print(f"$ {shown(cmd)}", flush=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{stage}.log"
    lines = []
    started = time.monotonic()
    with open(log_path, "w") as log, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            log.write(line)
            lines.append(line)
            print(f"  | {line.rstrip()}", flush=True)
        code = proc.wait()
    output = "".join(lines)
    if code != 0:
        raise StageFailed(f"stage {stage} failed (exit {code}) after {time.monotonic() - started:.0f}s; "
                          f"full output in {log_path}", output)
    return output


def last_json(output: str, stage: str) -> dict:
    """The last JSON object a job printed (pretrain and embed end with an indented JSON summary)."""
    lines = output.splitlines()
    for start in range(len(lines) - 1, -1, -1):
        if lines[start] != "{":
            continue
        end = next((i for i in range(start, len(lines)) if lines[i] == "}"), None)
        if end is not None:
            try:
                return json.loads("\n".join(lines[start:end + 1]))
            except json.JSONDecodeError:
                continue
    raise StageFailed(f"stage {stage}: no JSON summary found in its output")


def cpu_shares(workers: int) -> list[str]:
    """Ray CPU reservations that fit this machine: on a small one the trainers take half a CPU each, so
    the Ray Data tasks that feed them still find room (otherwise the stream waits for CPUs forever)."""
    cores = os.cpu_count() or 1
    per_worker = 1.0 if cores >= 2 * workers + 1 else 0.5
    return ["--cpus-per-worker", str(per_worker), "--data-cpus", "0.25"]


def require(stage: str, script: str) -> str:
    """The job's path relative to the repository (the jobs run from there), or a clear failure naming it."""
    if not (ROOT / script).exists():
        raise StageFailed(f"stage {stage}: {script} is not in this checkout yet")
    return script


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--home", help="ASTROMER_HOME for this run (default: $ASTROMER_HOME or ./.astromer)")
    parser.add_argument("--shared", help="folder of the real survey samples (the one holding data/)")
    parser.add_argument("--small", action="store_true", help="a reduced run: fewer curves, steps and scenarios")
    parser.add_argument("--curves", type=int, help="synthetic curves to simulate")
    parser.add_argument("--steps", type=int, help="pretraining steps")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers for pretraining")
    args = parser.parse_args(argv)

    plan = Plan.small() if args.small else Plan.default()
    if args.curves:
        plan.n_curves = args.curves
    if args.steps:
        plan.max_steps = args.steps
    home = Path(args.home or os.environ.get("ASTROMER_HOME") or ".astromer").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    lake = home / "lake"
    out = home / "quickstart"
    logs = out / "logs"
    env = dict(os.environ, ASTROMER_HOME=str(home), PYTHONUNBUFFERED="1")
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    tracking = env["MLFLOW_TRACKING_URI"]
    shared = Path(args.shared).expanduser().resolve() if args.shared else None
    if shared is not None and not (shared / "data").is_dir():
        parser.error(f"--shared {shared}: expected a folder holding data/ (the real survey samples)")
    py = sys.executable
    timings: dict[str, float] = {}
    started = time.monotonic()

    print(f"Astromer quickstart: home {home}\n  lake {lake}\n  MLflow {tracking}\n"
          f"  Ray {env.get('RAY_ADDRESS') or 'local (started by each job)'}", flush=True)
    try:
        # 1. ingest -----------------------------------------------------------------------------------
        t = time.monotonic()
        banner(f"1/5 ingest: a simulated {plan.years:g}-year survey of {plan.n_curves} objects (2 bands)"
               + (" and the real sets" if shared else ""))
        ingest = require("ingest", "ingest/run.py")
        run("ingest-synthetic", [py, ingest, "--survey", "synthetic", "--source",
                                 f"synthetic://?n={plan.n_curves}&seed=0&years={plan.years:g}", "--lake", str(lake),
                                 # the demo's simulated survey follows the plan's size, smaller ones included
                                 "--replace", "--no-progress"],
            env, logs)
        surveys = ["synthetic"]
        if shared is not None:
            for survey, folder, _ in REAL_SETS:
                run(f"ingest-{survey}", [py, ingest, "--survey", survey, "--source", str(shared / "data" / folder),
                                         "--lake", str(lake), "--no-progress"], env, logs)
                surveys.append(survey)
        timings["ingest"] = time.monotonic() - t

        # 2. pretrain ---------------------------------------------------------------------------------
        t = time.monotonic()
        corpus = "quickstart" if shared is None else "quickstart-real"
        banner(f"2/5 pretrain: Astromer 2 ({plan.preset} preset, window {plan.window_length}) for "
               f"{plan.max_steps} steps on Ray, {args.workers} workers")
        output = run("pretrain", [
            py, require("pretrain", "jobs/pretrain.py"), "--lake", str(lake), "--surveys", *surveys,
            "--corpus", corpus, "--preset", plan.preset, "--window-length", str(plan.window_length),
            "--max-steps", str(plan.max_steps), "--epochs", "1000", "--batch-size", str(plan.batch_size),
            "--num-workers", str(args.workers), *cpu_shares(args.workers), "--warmup-steps", str(max(1, plan.max_steps // 10)),
            "--val-every", str(max(10, plan.max_steps // 5)), "--checkpoint-every", str(plan.max_steps),
            "--patience", "1000", "--log-every", str(max(1, plan.max_steps // 20)),
            "--run-name", f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}"], env, logs)
        trained = last_json(output, "pretrain")
        model_uri = f"models:/{trained['registered']}/{trained['version']}"
        timings["pretrain"] = time.monotonic() - t

        # 3. embed ------------------------------------------------------------------------------------
        t = time.monotonic()
        banner(f"3/5 embed: {', '.join(surveys)} with {model_uri}")
        run("embed", [py, require("embed", "jobs/embed.py"), "--model", model_uri, "--lake", str(lake),
                      "--survey", *surveys], env, logs)
        timings["embed"] = time.monotonic() - t

        # 4. classify ---------------------------------------------------------------------------------
        t = time.monotonic()
        classify = require("classify", "jobs/classify.py")
        datasets = ["synthetic"] + ([d for _, _, d in REAL_SETS if d in plan.real_classify] if shared else [])
        banner(f"4/5 classify: {', '.join(datasets)}, {plan.folds} folds x {plan.samples_per_class} samples "
               "per class, against the baselines")
        results = {}
        for dataset in datasets:
            folder = out / f"classify-{dataset}"
            run(f"classify-{dataset}", [
                py, classify, "--model", model_uri, "--lake", str(lake), "--dataset", dataset,
                "--samples-per-class", *map(str, plan.samples_per_class), "--folds", str(plan.folds),
                "--test-per-class", str(plan.test_per_class), "--max-epochs", str(plan.max_epochs),
                "--patience", str(plan.patience), "--out", str(folder),
                "--run-name", f"quickstart-{dataset}"], env, logs)
            results[dataset] = folder
        timings["classify"] = time.monotonic() - t
    except StageFailed as exc:
        print(f"\nquickstart stopped: {exc}", file=sys.stderr, flush=True)
        return 1

    # 5. report ---------------------------------------------------------------------------------------
    banner("5/5 results")
    for dataset, folder in results.items():
        table = folder / "results.md"
        print(f"\n{dataset} (macro F1 etc., mean ± std over folds; {table}):\n")
        print(table.read_text() if table.exists() else f"(missing: {table})")
    print(f"\nregistered model: {model_uri} (run {trained.get('run_name')}, {trained.get('step', 0):.0f} steps; "
          f"production is version {trained.get('production')})")
    print(reconstruction_summary(trained))
    print_duckdb(lake, trained["registered"], str(trained["version"]), surveys[0])
    pngs = pretraining_plots(trained, out / "pretrain", tracking)
    pngs += sorted(p for folder in results.values() for p in folder.rglob("*.png"))
    print(f"\nfigures ({len(pngs)} PNGs, also logged to MLflow):")
    for png in pngs:
        print(f"  {png}")
    timings["total"] = time.monotonic() - started
    print("\nstage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    if tracking.startswith("sqlite:"):
        print(f"\nopen the MLflow UI:\n  {shown([py, '-m', 'mlflow'])} ui --backend-store-uri {tracking} "
              f"--host 127.0.0.1 --port 5000\n  then browse http://127.0.0.1:5000")
    else:
        print(f"\nthe runs are on the tracking server: {tracking}")
    print(f"stage logs: {logs}")
    return 0


#: the baselines the validation scores the model against (astromer.train.ProbedScore), in print order
BASELINES = (("baseline", "window mean"), ("interp", "interpolation"), ("smoother", "smoother"))


def reconstruction_summary(metrics: dict) -> str:
    """The model's validation RMSE on all probed values and on the hidden ones, each beside every baseline,
    and, plainly, the best baseline when it does better than the model (a short demo run often does not
    beat the smoother)."""
    lines = ["validation RMSE (mag), model against the baselines:"]
    for subset, what in (("", "all probed values"), ("hidden_", "hidden values only")):
        model = metrics.get(f"val_{subset}rmse")
        if model is None:
            continue
        baselines = {label: metrics[f"val_{subset}{key}_rmse"] for key, label in BASELINES
                     if f"val_{subset}{key}_rmse" in metrics}
        shown = ", ".join(f"{label} {value:.4f}" for label, value in baselines.items())
        lines.append(f"  {what}: model {model:.4f}; {shown}")
        if baselines:
            label, best = min(baselines.items(), key=lambda kv: kv[1])
            if best < model:
                lines.append(f"    the {label} does better than this model: more pretraining (or the imported "
                             "official weights) is needed for reconstructions worth having")
    return "\n".join(lines)


def pretraining_plots(trained: dict, folder: Path, tracking: str) -> list[Path]:
    """The pretraining run's learning curve and reconstruction plot, fetched from MLflow into ``folder``."""
    import mlflow
    from astromer.registry import setup_tracking

    setup_tracking(tracking)
    run_id = trained.get("mlflow_run_id")
    if not run_id:
        return []
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="plots", dst_path=str(folder))
    except Exception as exc:                      # noqa: BLE001 - the figures are a convenience here
        print(f"(the pretraining plots could not be fetched from MLflow: {exc})")
        return []
    return sorted(Path(local).rglob("*.png"))


def print_duckdb(lake: Path, model: str, version: str, survey: str) -> None:
    """Two queries a user would run next: the lake's contents, and nearest neighbours in embedding space."""
    from astromer.lake import connect

    con = connect(str(lake))
    counts = ("SELECT survey, band, count(*) AS curves, sum(n_obs) AS observations\n"
              "FROM lightcurves GROUP BY survey, band ORDER BY survey, band")
    print(f"\nDuckDB over the lake (astromer.lake.connect, or: astromer lake query \"SQL\" --lake {lake}):")
    print(counts)
    print(con.sql(counts))
    dim = con.execute("SELECT len(embedding) FROM embeddings WHERE model = ? AND CAST(version AS VARCHAR) = ? "
                      "LIMIT 1", [model, version]).fetchone()[0]
    similar = (
        f"WITH e AS (SELECT survey, object_id, band, embedding::FLOAT[{dim}] AS v FROM embeddings\n"
        "           WHERE model = ? AND CAST(version AS VARCHAR) = ? AND survey = ?),\n"
        "     q AS (SELECT object_id, band, v FROM e ORDER BY object_id, band LIMIT 1)\n"
        "SELECT e.object_id, e.band, l.label, array_cosine_similarity(e.v, q.v) AS similarity\n"
        "FROM e CROSS JOIN q\n"
        "LEFT JOIN labels l ON l.survey = e.survey AND l.object_id = e.object_id AND l.label_set = 'class'\n"
        "ORDER BY similarity DESC LIMIT 5")
    print(f"\nthe curves most similar to the first one (cosine over {model} v{version} embeddings):")
    print(similar)
    print(con.execute(similar, [model, version, survey]).fetch_df().to_string(index=False))


if __name__ == "__main__":
    sys.exit(main())
