"""Configuration dataclasses: the model (with the presets that reproduce the published models), the
windowing rule and the pretraining mask. Every config round-trips through JSON."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

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
