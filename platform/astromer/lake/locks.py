"""One ingest of a survey at a time: a lock file in the lake, taken before the plan and given back at the end.

Two ingests of one survey publishing at once would interleave their parts and each remove the other's as
stale. The lock is ``_ingest/survey=<s>/lock.json``, naming who holds it (host, process, its start time,
the source, the command). It is created in one step that fails when the file exists: locally a complete
temporary file is hard-linked onto the name (the link is atomic and the holder's details are there from
the first instant); elsewhere an existing lock is looked for, then fsspec's exclusive-create mode (``xb``:
object stores that support conditional writes refuse the second PUT), read back to see whose it is (a store
without conditional writes keeps the last writer's file: two ingests started in the same instant could
then both go on).

A lock whose holder is gone is taken over: on this machine (the same host name, boot and process-number
namespace: containers may share a host name), a process that no longer runs (or a process of the same
number started later: the number was reused) held it, as after a kill. A holder elsewhere cannot be
checked from here, so such a lock is only broken when asked (``break_lock``, ``--break-lock``): the error
says who holds it and since when.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import uuid

from astromer.lake.paths import LakePaths, _protocols
from astromer.lake.writers import read_json, tmp_name


class SurveyLocked(RuntimeError):
    """Another ingest of the survey holds its lock."""


def process_started(pid: int) -> float | None:
    """When process ``pid`` of this host started (seconds since the epoch), None when it does not run."""
    import psutil

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return -1.0      # runs, as another user: not ours to judge, so it still holds the lock


def _read_text(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def machine() -> dict:
    """What tells this machine and process namespace from others: the host name, the boot (a restarted host
    reuses process numbers) and the process-number namespace (containers on one host may share its name)."""
    try:
        pid_ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pid_ns = None
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"), "pid_ns": pid_ns}


def this_process() -> dict:
    """This process, as a lock or a run records its holder: :func:`machine`, the process and its start."""
    return {**machine(), "pid": os.getpid(), "process_started": process_started(os.getpid())}


def on_this_machine(holder: dict) -> bool:
    """Whether ``holder`` (:func:`this_process` of some process) ran where this process runs (a record without
    the boot and namespace, written before they were, is judged by its host name)."""
    return all(holder.get(key) == value for key, value in machine().items() if key == "host" or key in holder)


def holder_is_gone(holder: dict) -> bool:
    """Whether the lock's holder ran on this machine (and process namespace) and no longer runs."""
    if not on_this_machine(holder):
        return False
    started = process_started(int(holder.get("pid", -1)))
    return started is None or (started > 0 and abs(started - float(holder.get("process_started", 0))) > 1.0)


def _describe(holder: dict, shown: str) -> str:
    return (f"ingest of {holder.get('source', '?')} by process {holder.get('pid', '?')} on {holder.get('host', '?')}"
            f" since {holder.get('started_at', '?')} (lock {shown})")


def _create_exclusive(fs, path: str, payload: bytes) -> bool:
    """Create ``path`` holding ``payload`` unless it exists; whether this call created it."""
    if "file" in _protocols(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tmp_name(path)
        with open(tmp, "wb") as f:
            f.write(payload)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    fs.invalidate_cache(os.path.dirname(path))    # an object store's listing may be cached from a while ago
    if fs.exists(path):        # a store without conditional writes takes "xb" as "wb": never write over a lock
        return False
    try:
        with fs.open(path, "xb") as f:
            f.write(payload)
    except FileExistsError:
        return False
    # two writers between the check and the write on such a store: the last writer's file is the lock
    return fs.cat_file(path) == payload


def _read_holder(fs, path: str) -> dict | None:
    try:
        return read_json(fs, path)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {}       # not ours to parse: held by something that wrote another format


@contextlib.contextmanager
def survey_lock(lake: str | LakePaths, survey: str, *, source: str = "", break_lock: bool = False, stream=None):
    """Hold ``survey``'s ingest lock for the block; :class:`SurveyLocked` when another ingest holds it."""
    paths = lake if isinstance(lake, LakePaths) else LakePaths(lake)
    fs, path = paths.fs, paths.ingest_lock(survey)
    stream = stream or sys.stderr
    me = {"token": uuid.uuid4().hex, **this_process(), "source": source, "command": " ".join(sys.argv),
          "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    payload = json.dumps(me, indent=1).encode()
    made = _missing_folders(fs, os.path.dirname(path))    # removed again with the lock when left empty
    with _acquiring(fs, os.path.dirname(path)):
        _acquire(fs, path, payload, survey, break_lock, stream, paths.url_of(path))
    try:
        yield me
    finally:
        _remove_if_holder(fs, path, me)
        for folder in made:       # a run refused before writing anything leaves no empty lake behind
            with contextlib.suppress(OSError):
                if not fs.ls(folder):
                    fs.rmdir(folder)


@contextlib.contextmanager
def _acquiring(fs, folder: str):
    """Locally, one process at a time takes or takes over a lock of ``folder`` (an flock on the folder): a
    takeover's check and removal cannot interleave with another's. Elsewhere there is nothing to hold."""
    if "file" not in _protocols(fs):
        yield
        return
    import fcntl

    os.makedirs(folder, exist_ok=True)
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)          # closing the descriptor releases the flock


def _acquire(fs, path: str, payload: bytes, survey: str, break_lock: bool, stream, shown: str) -> None:
    for _ in range(3):
        if _create_exclusive(fs, path, payload):
            break
        holder = _read_holder(fs, path)
        if holder is None:
            continue                              # given back between the two calls: try again
        if not (break_lock or holder_is_gone(holder)):
            raise SurveyLocked(f"another ingest of {survey} is running: {_describe(holder, shown)}. Wait for it to "
                               "end; if it ended without giving the lock back (killed on another machine), run "
                               "again with --break-lock")
        print(f"taking over the ingest lock of {survey} from {_describe(holder, shown)}: "
              f"{'--break-lock' if break_lock else 'that process no longer runs'}", file=stream)
        _remove_if_holder(fs, path, holder)
    else:
        raise SurveyLocked(f"could not take the ingest lock of {survey} ({shown}): it changed hands three times")


def _missing_folders(fs, folder: str) -> list[str]:
    """The folders on the way to ``folder`` that do not exist yet, deepest first."""
    missing = []
    while folder and folder not in ("/", ".") and not fs.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _remove_if_holder(fs, path: str, holder: dict) -> None:
    """Remove the lock when it is still ``holder``'s (another ingest may have taken it over since)."""
    current = _read_holder(fs, path)
    if current is not None and current.get("token") == holder.get("token"):
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)
