"""Open the MLflow UI page of a run in headless Chromium, check that the run is rendered, save a screenshot.

    infra/check-ui                                  # the latest run on $MLFLOW_TRACKING_URI
    infra/check-ui --run-id RUN_ID --out run.png
    infra/check-ui --tracking-uri http://127.0.0.1:5000

Two Chromium passes over the same URL: ``--dump-dom`` (the page after its scripts ran: the run's name must
be in it, so a blank or error page fails the check) and ``--screenshot`` (the PNG, which must not be a
single flat colour). Needs a tracking *server* (http://...; infra/local-up starts one) and a Chromium
(``apt-get install chromium`` on Debian).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def find_chromium(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if shutil.which(explicit) else None
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def api(base: str, path: str, body: dict | None = None) -> dict:
    """One MLflow REST call (GET with query parameters, or POST with a JSON body)."""
    if body is None:
        request = urllib.request.Request(f"{base}{path}")
    else:
        request = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


def find_run(base: str, run_id: str | None) -> dict:
    """The run's info (the given one, or the most recently started run of any experiment)."""
    if run_id:
        return api(base, "/api/2.0/mlflow/runs/get?" + urllib.parse.urlencode({"run_id": run_id}))["run"]["info"]
    experiments = api(base, "/api/2.0/mlflow/experiments/search", {"max_results": 1000}).get("experiments", [])
    if not experiments:
        raise SystemExit(f"check-ui: no experiments on {base}")
    runs = api(base, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [e["experiment_id"] for e in experiments], "max_results": 1,
        "order_by": ["attributes.start_time DESC"]}).get("runs", [])
    if not runs:
        raise SystemExit(f"check-ui: no runs on {base}")
    return runs[0]["info"]


def chromium(binary: str, mode: list[str], url: str, wait_ms: int, timeout_s: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="check-ui-") as profile:
        cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,900",
               f"--virtual-time-budget={wait_ms}", *mode, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)


def picture_summary(png: Path) -> tuple[tuple[int, int], int]:
    """(width, height) and the number of distinct colours (a blank page has one or two)."""
    from PIL import Image

    with Image.open(png) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
        return image.size, len(colours) if colours is not None else 1 << 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow server URL (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--run-id", help="the run to open (default: the latest run)")
    parser.add_argument("--out", help="PNG path (default: $ASTROMER_HOME/ui-check/run-<id>.png)")
    parser.add_argument("--chromium", help="browser binary (default: the first of " + ", ".join(CHROMIUM_NAMES) + ")")
    parser.add_argument("--wait-ms", type=int, default=15000, help="virtual time the page's scripts get to render")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per browser pass")
    args = parser.parse_args(argv)

    base = (args.tracking_uri or "").rstrip("/")
    if not base.startswith(("http://", "https://")):
        parser.error(f"--tracking-uri {base or '(unset)'}: the UI check needs an MLflow server URL (infra/local-up)")
    binary = find_chromium(args.chromium)
    if binary is None:   # a missing browser, not a mistaken command line: no usage text, exit 1
        looked = args.chromium or ", ".join(CHROMIUM_NAMES)
        print(f"check-ui: no Chromium found (looked for {looked}); install it (Debian: apt-get install -y "
              "chromium) or name the binary with --chromium PATH", file=sys.stderr)
        return 1
    run = find_run(base, args.run_id)
    run_id, name = run["run_id"], run.get("run_name") or run["run_id"]
    url = f"{base}/#/experiments/{run['experiment_id']}/runs/{run_id}"
    home = Path(os.environ.get("ASTROMER_HOME", ".astromer"))
    out = Path(args.out) if args.out else home / "ui-check" / f"run-{run_id}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"check-ui: run {name} ({run_id})\n  page {url}", flush=True)

    dom = chromium(binary, ["--dump-dom"], url, args.wait_ms, args.timeout)
    rendered = dom.returncode == 0 and name in dom.stdout
    print(f"  rendered page: {len(dom.stdout)} characters of DOM, run name "
          f"{'found' if rendered else 'NOT found'}", flush=True)

    partial = out.with_name(out.name + ".partial.png")
    shot = chromium(binary, [f"--screenshot={partial}"], url, args.wait_ms, args.timeout)
    if shot.returncode != 0 or not partial.exists():
        print(f"check-ui: the screenshot failed (exit {shot.returncode}):\n{shot.stderr[-2000:]}", file=sys.stderr)
        return 1
    partial.replace(out)
    size, colours = picture_summary(out)
    print(f"  screenshot {out}: {size[0]}x{size[1]}, {colours} colours", flush=True)
    if not rendered:
        print(f"check-ui: the page did not show run {name!r}; chromium said:\n{dom.stderr[-2000:]}", file=sys.stderr)
        return 1
    if colours < 16:
        print("check-ui: the screenshot is blank", file=sys.stderr)
        return 1
    print("check-ui: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
