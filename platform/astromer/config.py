"""Configuration dataclasses: the model (with the presets that reproduce the published models), the
windowing rule and the pretraining mask. Every config round-trips through JSON. Also how every job reads a
settings file (YAML, TOML or JSON) and checks each value against its setting's declared type."""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

WINDOW_RULES = ("astromer1", "astromer2")
RESIDUALS = ("none", "projection")
ATTENTION_MASKS = ("additive_one", "key_neg_inf")
ATTENTION_IMPLS = ("reference", "sdpa")
ACTIVATIONS = ("tanh", "relu", "gelu")


@dataclass
class ModelConfig:
    """Hyper-parameters of one Astromer encoder plus its reconstruction head.

    The defaults are those of Astromer 1 (the ASTROMER 0.1.8 library that the MACHO weights belong to).
    """

    name: str = "astromer1"
    n_layers: int = 2
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 128
    ffn_activation: str = "tanh"
    residual: str = "none"                  # "none" (Astromer 1) | "projection" (Astromer 2's reshape_leak)
    layernorm_eps: float = 1e-6
    attention_mask: str = "additive_one"    # Astromer 1 adds +1 on padding; Astromer 2 hides masked keys
    mask_token: bool = False                # trainable [MASK] scalar replacing hidden magnitudes (Astromer 2)
    dropout: float = 0.1
    pe_base: float = 10000.0
    window_length: int = 200
    window_rule: str = "astromer1"          # how `embed` cuts a curve into windows (see astromer.windows)
    attention_impl: str = "sdpa"            # "reference" (explicit softmax) | "sdpa" (fused kernel)

    def __post_init__(self) -> None:
        def check(field: str, value, allowed) -> None:
            if value not in allowed:
                raise ValueError(f"ModelConfig.{field}={value!r}: expected one of {allowed}")

        check("window_rule", self.window_rule, WINDOW_RULES)
        check("residual", self.residual, RESIDUALS)
        check("attention_mask", self.attention_mask, ATTENTION_MASKS)
        check("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        check("ffn_activation", self.ffn_activation, ACTIVATIONS)
        for field in ("n_layers", "d_model", "n_heads", "d_ff", "window_length"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{field}={value!r}: expected a positive integer")
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        for field in ("dropout", "layernorm_eps", "pe_base"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"ModelConfig.{field}={value!r}: expected a number")
        if not isinstance(self.mask_token, bool):
            raise ValueError(f"ModelConfig.mask_token={self.mask_token!r}: expected true or false")
        if not isinstance(self.name, str):
            raise ValueError(f"ModelConfig.name={self.name!r}: expected a string")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout={self.dropout!r}: expected 0 <= dropout < 1")
        if self.layernorm_eps <= 0 or self.pe_base <= 0:
            raise ValueError("ModelConfig: layernorm_eps and pe_base must be positive")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # ---- presets -------------------------------------------------------------------------------
    @classmethod
    def astromer1(cls) -> ModelConfig:
        """ASTROMER 0.1.8 / MACHO weights: 2 blocks, no residuals, tanh FFN 128, +1 padding mask.
        661,505 parameters with the reconstruction head."""
        return cls(name="astromer1", n_layers=2, d_model=256, n_heads=4, d_ff=128, residual="none",
                   attention_mask="additive_one", mask_token=False, dropout=0.1, window_rule="astromer1")

    @classmethod
    def astromer2(cls) -> ModelConfig:
        """Astromer 2 (official main-code): 6 blocks, FFN 512, learned residual projections, [MASK] token,
        key masking. 3,952,640 parameters in the input projection + blocks, 3,953,410 in all."""
        return cls(name="astromer2", n_layers=6, d_model=256, n_heads=4, d_ff=512, residual="projection",
                   attention_mask="key_neg_inf", mask_token=True, dropout=0.1, window_rule="astromer2")

    @classmethod
    def tiny(cls) -> ModelConfig:
        """A small Astromer-2-style model for tests and demos (fast on a CPU)."""
        return cls(name="tiny", n_layers=2, d_model=32, n_heads=2, d_ff=64, residual="projection",
                   attention_mask="key_neg_inf", mask_token=True, dropout=0.0, window_length=64,
                   window_rule="astromer2")

    # ---- JSON round-trip -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        if not isinstance(data, dict):
            raise ValueError(f"ModelConfig: expected a mapping of field names to values, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}")
        return cls(**data)

    def to_json(self, path: str | os.PathLike) -> Path:
        return _write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelConfig:
        """The config in a JSON file; a file that is not JSON or not a valid config raises one ValueError that
        names it (a missing one: FileNotFoundError)."""
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "astromer1": ModelConfig.astromer1,
    "astromer2": ModelConfig.astromer2,
    "tiny": ModelConfig.tiny,
}


@dataclass
class WindowConfig:
    """How a light curve becomes fixed-length windows (see astromer.windows)."""

    length: int = 200
    rule: str = "astromer2"

    def __post_init__(self) -> None:
        if self.rule not in WINDOW_RULES:
            raise ValueError(f"WindowConfig.rule={self.rule!r}: expected one of {WINDOW_RULES}")
        if self.length < 1:
            raise ValueError(f"WindowConfig.length={self.length!r}: expected a positive integer")


@dataclass
class MaskConfig:
    """The pretraining selection with the official counts: floor(probed * n) observations are probed; of
    those, ceil(same * count) keep their value, then ceil(random * remaining) get the magnitude of another
    observation of the window; the rest are hidden ([MASK])."""

    probed: float = 0.5
    same: float = 0.2
    random: float = 0.2

    def __post_init__(self) -> None:
        for field in ("probed", "same", "random"):
            value = getattr(self, field)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"MaskConfig.{field}={value!r}: expected a fraction in [0, 1]")
        if self.probed == 0:   # the loss is over the probed observations: with none it is NaN from the start
            raise ValueError(f"MaskConfig.probed={self.probed!r}: expected a fraction in (0, 1]: the loss is "
                             "computed over the probed observations")


# --------------------------------------------------------------------------- settings files and types

def check_setting_types(config, prefix: str = "") -> None:
    """Every setting of the type its field declares, whatever gave it (a settings file has no types of its
    own): raises ValueError naming the setting (after ``prefix``, a section such as ``classifier.``). A
    quoted "false" would otherwise be true, and a number in quotes a string that fails much later. Numbers
    in text are read as numbers (YAML reads 1e-3 as text), whole floats pass as ints, ints as floats, a lone
    name as a list of one, a list as a tuple."""
    import types
    import typing

    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                continue
            hint = next(a for a in args if a is not type(None))
        setattr(config, f.name, typed_setting(prefix + f.name, value, hint))


def typed_setting(name: str, value, hint):
    """``value`` as the type ``hint`` names (see check_setting_types), or a ValueError naming the setting."""
    import numbers
    import typing

    origin, given = typing.get_origin(hint) or hint, value
    if origin in (int, float) and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    # numpy's numbers too (a search algorithm's samples): numbers.Real; a flag is not a number
    flag = isinstance(value, (bool, np.bool_))
    number = not flag and isinstance(value, numbers.Real) and math.isfinite(value)
    if origin is bool:
        if flag:
            return bool(value)
        expected = "true or false"
    elif origin is int:
        if number and float(value).is_integer():
            return int(value)
        expected = "a whole number"
    elif origin is float:
        if number:
            return float(value)
        expected = "a finite number"
    elif origin is str:
        if isinstance(value, str):
            return value
        expected = "a text"
    elif origin is list:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(v, str) for v in items):
            return list(items)
        expected = "a list of names"
    elif origin is tuple:
        item = (typing.get_args(hint) or (None,))[0]
        items = [value] if isinstance(value, str) and item is str else value
        if isinstance(items, (list, tuple)):
            try:
                return tuple(typed_setting(name, v, item) for v in items)
            except ValueError:
                pass
        expected = {int: "a list of whole numbers", float: "a list of numbers", str: "a list of names"}.get(
            item, "a list")
    elif origin is dict:
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        expected = "a mapping"
    else:
        return value
    raise ValueError(f"setting {name}={given!r} ({type(given).__name__}): expected {expected}")


def read_settings_file(path: str | os.PathLike) -> dict[str, Any]:
    """A settings file's mapping: YAML (``.yaml``, ``.yml``), TOML (``.toml``), else JSON. A file that does
    not parse raises a ValueError naming it, with the line and column."""
    import tomllib

    import yaml

    path = str(path)
    if "://" in path:      # a settings file on a store (s3://bucket/best.json): read through fsspec
        import fsspec

        with fsspec.open(path, "r", encoding="utf-8") as handle:
            text = handle.read()
    else:
        text = Path(path).read_text()
    suffix = os.path.splitext(path)[1].lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise ValueError(f"{path}: not valid YAML at line {mark.line + 1} column {mark.column + 1}: {exc.problem}"
                         ) from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    except json.JSONDecodeError as exc:
        kind = "" if suffix == ".json" else " (a settings file is .json, .yaml, .yml or .toml)"
        raise ValueError(f"{path}: not valid JSON{kind} at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of setting names to values")
    return data


def file_mode() -> int:
    """The mode a plain new file gets under the process's umask (what ``open`` would give)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_json_atomic(path: Path, data: dict) -> Path:
    """Write JSON under a temporary name in the same folder, then rename: no partial file is visible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.chmod(tmp, file_mode())   # mkstemp's file is private (0600); a config is not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
