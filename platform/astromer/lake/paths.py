"""The one place that turns lake names into paths, and the validation that names pass first.

A lake root is a local folder or any fsspec URL (``s3://bucket/lake``, ``memory://lake``).
Survey, band, object, window, model and version names are checked against a conservative pattern
before they become part of a path: no separators, no ``..``, no control characters.

    lightcurves/survey=<s>/band=<b>/part-<n>.parquet
    labels/survey=<s>/part-<n>.parquet
    windows/<name>.zarr
    embeddings/model=<m>/version=<v>/survey=<s>/part-<n>.parquet
    _ingest/survey=<s>/{manifest,quarantine}.parquet, _ingest/survey=<s>/lock.json (while an ingest runs),
    _ingest/runs/<ingest_id>/...
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import url_to_fs

_PART_NAME = re.compile(r"part-\d{5,}\.parquet")
_SURVEY = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_BAND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,15}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# object ids are data, not paths, but they do reach file names (window back-references, exports),
# so they follow the same rule with a few more punctuation characters that catalogues use
_OBJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+\-]{0,127}$")


#: the rules above in words, for messages that name a rejected value
OBJECT_RULE = "an object name is 1-128 letters, digits and . _ : + -, starting with a letter or digit, without '..'"
BAND_RULE = "a band name is 1-16 letters, digits, _ and -, starting with a letter or digit"


class InvalidName(ValueError):
    """A survey/band/object/window name that must not become a path."""


def _check(kind: str, value: str, pattern: re.Pattern) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value) or ".." in value:
        raise InvalidName(f"invalid {kind} name {value!r}: expected {pattern.pattern} without '..'")
    return value


def validate_survey(name: str) -> str:
    return _check("survey", name, _SURVEY)


def validate_band(name: str) -> str:
    return _check("band", name, _BAND)


def validate_name(name: str, kind: str = "name") -> str:
    return _check(kind, name, _NAME)


def validate_object_id(name: str) -> str:
    return _check("object", name, _OBJECT)


def is_valid_object_id(name: str) -> bool:
    return isinstance(name, str) and bool(_OBJECT.fullmatch(name)) and ".." not in name


def is_valid_band(name: str) -> bool:
    return isinstance(name, str) and bool(_BAND.fullmatch(name)) and ".." not in name


#: below this many names the per-name checks are cheaper than pyarrow's vectorised ones
SMALL_BATCH = 64


def valid_objects_and_bands(object_ids: list, bands: list) -> np.ndarray:
    """``is_valid_object_id(o) and band is valid`` for many curves at once (pyarrow's RE2 over the
    whole list; the patterns are anchored, and RE2's ``$`` matches only at the very end). A few names (an
    archive of one object) are checked one by one: pyarrow's five calls cost about 0.9 ms whatever the length."""
    one_by_one = len(object_ids) < SMALL_BATCH
    if not one_by_one:
        try:
            ids = pa.array(object_ids, type=pa.string())
            names = pa.array(bands, type=pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError):      # not all strings
            one_by_one = True
    if one_by_one:
        return np.array([is_valid_object_id(o) and is_valid_band(b) for o, b in zip(object_ids, bands)], dtype=bool)
    ok = pc.and_(pc.match_substring_regex(ids, _OBJECT.pattern), pc.invert(pc.match_substring(ids, "..")))
    ok = pc.and_(ok, pc.match_substring_regex(names, _BAND.pattern))
    return ok.fill_null(False).to_numpy(zero_copy_only=False)


@dataclass
class LakePaths:
    """Paths of one lake. ``fs`` is the fsspec filesystem and ``root`` the path inside it."""

    url: str
    fs: fsspec.AbstractFileSystem = field(init=False, repr=False)
    root: str = field(init=False)

    def __post_init__(self):
        self.url = str(self.url)
        self.fs, root = url_to_fs(self.url)
        self.root = root.rstrip("/") or "/"

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def uncached_fs(self) -> fsspec.AbstractFileSystem:
        """The lake's filesystem without cached listings, for a reader that lives on while jobs publish (a
        DuckDB connection): a cached listing names files a publish has replaced since, and reading one fails
        (S3: "The remote file ... no longer exists")."""
        if self.is_local:
            return self.fs
        return type(self.fs)(**{**self.fs.storage_options, "skip_instance_cache": True,
                                "use_listings_cache": False})

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url_of(self, path: str) -> str:
        """A path inside ``fs`` back as a URL (what DuckDB and Ray are given)."""
        if self.is_local:
            return path
        return self.fs.unstrip_protocol(path)

    # tables ------------------------------------------------------------------------------------
    def lightcurves(self, survey: str | None = None, band: str | None = None) -> str:
        parts = ["lightcurves"]
        if survey is not None:
            parts.append(f"survey={validate_survey(survey)}")
            if band is not None:
                parts.append(f"band={validate_band(band)}")
        return self.join(*parts)

    def labels(self, survey: str | None = None) -> str:
        parts = ["labels"]
        if survey is not None:
            parts.append(f"survey={validate_survey(survey)}")
        return self.join(*parts)

    def windows(self, name: str | None = None) -> str:
        if name is None:
            return self.join("windows")
        return self.join("windows", f"{validate_name(name, 'window set')}.zarr")

    def embeddings(self, model: str | None = None, version: str | None = None,
                   survey: str | None = None) -> str:
        parts = ["embeddings"]
        if model is not None:
            parts.append(f"model={validate_name(model, 'model')}")
            if version is not None:
                parts.append(f"version={validate_name(str(version), 'version')}")
                if survey is not None:
                    parts.append(f"survey={validate_survey(survey)}")
        return self.join(*parts)

    def embedding_report(self, model: str, version: str, survey: str) -> str:
        """The embed job's report of one survey: what it embedded, skipped, and from which ingest."""
        return "/".join([self.embeddings(model, version), "_reports", f"survey={validate_survey(survey)}.json"])

    def ingest(self, survey: str | None = None) -> str:
        if survey is None:
            return self.join("_ingest")
        return self.join("_ingest", f"survey={validate_survey(survey)}")

    def ingest_lock(self, survey: str) -> str:
        """The lock an ingest of ``survey`` holds while it runs (:mod:`astromer.lake.locks`)."""
        return f"{self.ingest(survey)}/lock.json"

    def run(self, ingest_id: str) -> str:
        return self.join("_ingest", "runs", validate_name(ingest_id, "ingest id"))

    def own_labels(self, survey: str, name: str = "labels") -> str:
        """A labels file of the user's own (``own-<name>.parquet``): an ingest of the survey replaces and
        removes only its ``part-*`` files, so this one outlives re-ingests."""
        return f"{self.labels(survey)}/own-{validate_name(name, 'labels file name')}.parquet"

    @staticmethod
    def part_name(index: int) -> str:
        return f"part-{index:05d}.parquet"

    @staticmethod
    def is_part_name(name: str) -> bool:
        """Whether a file name is one :meth:`part_name` gives (the files an ingest writes and removes)."""
        return _PART_NAME.fullmatch(name) is not None


def check_bucket(fs, path: str, what: str) -> None:
    """Refuse a path on an object store whose bucket does not exist, naming ``what`` (a flag): s3fs makes a
    missing bucket on the first write, so a mistyped name became a new bucket holding the job's output."""
    if {"file", "memory"} & set(_protocols(fs)):
        return
    bucket = fs._strip_protocol(path).split("/", 1)[0]
    fs.invalidate_cache(bucket)
    try:
        fs.info(bucket)       # not exists(): it answers False for a store it cannot reach, too
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {fs.unstrip_protocol(fs._strip_protocol(path))}: there is no bucket "
                                f"{bucket!r} (the jobs never make one: check the name, or make it first)") from None


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
