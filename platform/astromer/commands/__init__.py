"""Command groups of the ``astromer`` CLI: each module defines ``register(parser)`` that adds its
sub-commands and sets ``func`` on each, a callable taking the parsed args and returning an exit code."""
from __future__ import annotations

import argparse
import functools
import sys

#: what a user's mistake raises (a path or store that exists or not, a name or value the lake, the registry or
#: a settings file does not know): a command reports it in one line and exits 2, with no traceback
USER_ERRORS = (FileExistsError, FileNotFoundError, LookupError, ValueError)
try:   # an object store that cannot be reached or refuses the credentials (s3fs, with the s3 extra)
    from botocore.exceptions import BotoCoreError

    STORE_ERRORS: tuple = (BotoCoreError,)
except ImportError:
    STORE_ERRORS = ()
USER_ERRORS = USER_ERRORS + STORE_ERRORS


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with the error line first: a job with fifty flags printed a usage block of thirty
    lines above it, and the line that says what was wrong scrolled out of sight. A short usage (a few
    lines) still follows the error; a long one is left to ``--help``."""

    SHORT_USAGE_LINES = 4

    def error(self, message: str):
        usage = self.format_usage()
        hint = usage if usage.count("\n") <= self.SHORT_USAGE_LINES else f"see {self.prog} --help for every flag\n"
        self.exit(2, f"error: {message}\n{hint}")


def error_line(exc: BaseException) -> str:
    """The message of ``exc`` (a KeyError's str() would quote it); what an object store said, with the settings
    that decide where it is and who asks."""
    if STORE_ERRORS and isinstance(exc, STORE_ERRORS):
        return (f"the object store: {exc} (its settings: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or another "
                "credential, and AWS_ENDPOINT_URL for MinIO or Ceph; Ray's workers need them too: see "
                "docs/deployment.md)")
    return str(exc.args[0]) if isinstance(exc, LookupError) and exc.args else str(exc)


def report_usage_error(exc: BaseException) -> int:
    print(f"error: {error_line(exc)}", file=sys.stderr)
    return 2


def one_line_errors(run):
    """Decorate a command's ``run(args)``: :data:`USER_ERRORS` end it with one line and exit status 2."""
    @functools.wraps(run)
    def wrapped(args) -> int:
        try:
            return run(args)
        except USER_ERRORS as exc:
            return report_usage_error(exc)
    return wrapped


def check_output(path, flag: str = "--out", folder: bool = True) -> None:
    """Refuse, before any work, an output ``path`` that cannot be written: a file where a folder is to be
    (``folder``) or a folder where a file is, or a file where one of its parent folders would be made.
    Raises FileExistsError naming the flag and what is in the way."""
    from pathlib import Path

    if "://" in str(path):   # pathlib would make a local folder named "s3:" and report success
        raise ValueError(f"{flag} {path}: expected a local {'folder' if folder else 'file'} (this output is "
                         "written to the local disk, not to an object store)")
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise FileExistsError(f"{flag} {path}: a {'file' if folder else 'folder'} is there; expected "
                              f"{'a folder (new or existing)' if folder else 'a file name (new or existing)'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(f"{flag} {path}: {parent} is a file, not a folder")
            break


# argparse types of counts: a flag out of range is refused before anything starts, naming the flag

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number >= 0")
    return value


def non_negative_float(text: str) -> float:
    import math

    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value
