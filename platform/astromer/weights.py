"""Model files and the official TensorFlow checkpoints, without TensorFlow.

A model folder holds ``model.safetensors`` and ``config.json``; nothing is ever unpickled.

The official weights are TensorFlow "tensor bundle" checkpoints: ``weights.index`` is a LevelDB-format
table (sorted, prefix-compressed keys in blocks with restart points, an index block and a 48-byte footer)
whose values are ``BundleEntryProto`` protobufs (dtype, shape, shard, offset, size, masked crc32c) and
whose empty key holds a ``BundleHeaderProto``; ``weights.data-0000K-of-0000N`` holds the raw
little-endian tensor bytes. Both are parsed here by hand.
"""
from __future__ import annotations

import json
import os
import re
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from astromer.config import PRESETS, ModelConfig, file_mode

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


# ================================================================================================
# Model folders: safetensors + JSON config
# ================================================================================================
def save_model(model, out_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write ``out_dir/model.safetensors`` and ``out_dir/config.json`` (each via a temporary name)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "astromer_config": json.dumps(model.config.to_dict(), sort_keys=True)}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    fd, tmp = tempfile.mkstemp(prefix=f".{MODEL_FILE}.", suffix=".tmp", dir=out)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.chmod(tmp, file_mode())   # mkstemp's file is private (0600); the model is not
        os.replace(tmp, out / MODEL_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    model.config.to_json(out / CONFIG_FILE)
    return out


def weights_digest(path: str | os.PathLike) -> str:
    """sha256 over a model folder's tensors (names, dtypes, shapes, values in name order). The file's own
    bytes would not do: safetensors writes its metadata in no fixed order."""
    import hashlib

    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(Path(path) / MODEL_FILE), framework="numpy") as handle:
        for name in sorted(handle.keys()):
            value = handle.get_tensor(name)
            digest.update(f"{name}\x1f{value.dtype.str}\x1f{value.shape}\x1e".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def read_model_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a file that is not one (truncated, garbled header) raises a
    ValueError that names it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Build an Astromer from ``path/config.json`` and load ``path/model.safetensors`` (strict). A damaged
    folder (config that is not JSON or not a valid config, unreadable safetensors, tensors that do not fit
    the config, NaN or infinite values) raises one ValueError naming the file."""
    from astromer.model import Astromer

    folder = Path(path)
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: missing {name} (a model folder holds {MODEL_FILE} + {CONFIG_FILE})")
    model = Astromer(ModelConfig.from_json(folder / CONFIG_FILE))
    state = read_model_tensors(folder / MODEL_FILE, device=device)
    mismatch = shape_mismatch(model.config, _shapes(model.state_dict()), _shapes(state))
    if mismatch:
        raise ValueError(f"{folder / MODEL_FILE}: does not match {folder / CONFIG_FILE}: {mismatch}")
    check_finite(state, folder / MODEL_FILE)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{folder / MODEL_FILE}: does not match {folder / CONFIG_FILE}: {exc}") from None
    model.eval()
    return model.to(device)


def check_finite(state: dict[str, torch.Tensor], where: str | os.PathLike) -> None:
    """Raise a ValueError naming ``where``, the first tensor and its count when a tensor holds NaN or
    infinite values (a damaged file: every output of the model would be NaN)."""
    bad = {name: int((~torch.isfinite(value)).sum()) for name, value in state.items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())}
    if bad:
        name = next(iter(bad))
        more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        raise ValueError(f"{where}: tensor {name} has {bad[name]:,} non-finite values{more}")


def _shapes(state: dict) -> dict[str, tuple[int, ...]]:
    return {name: tuple(value.shape) for name, value in state.items()}


def shape_mismatch(config: ModelConfig, expected: dict[str, tuple], found: dict[str, tuple]) -> str | None:
    """Why tensors of the shapes ``found`` do not fit the model ``config`` builds (``expected``: its shapes),
    in a line (None: they fit): the config's setting the file contradicts where one explains it."""
    def blocks(names) -> int:
        return len({m.group(1) for n in names if (m := re.match(r"encoder\.blocks\.(\d+)\.", n))})

    for name, want in expected.items():
        have = found.get(name)
        if have is None or tuple(have) == tuple(want):
            continue
        if len(have) == len(want):
            for want_dim, have_dim in zip(want, have):
                if want_dim == have_dim:
                    continue
                for field in ("d_model", "d_ff", "n_heads"):
                    if getattr(config, field) == want_dim:
                        return (f"{CONFIG_FILE} says {field} {want_dim}; {MODEL_FILE} holds {have_dim} "
                                f"({name})")
        return f"{name} is {list(have)} in {MODEL_FILE}, {list(want)} by {CONFIG_FILE}"
    if blocks(found) != blocks(expected):
        return f"{CONFIG_FILE} says n_layers {config.n_layers}; {MODEL_FILE} holds {blocks(found)} blocks"
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    if any(".leak" in n for n in missing + unexpected):
        return (f"{CONFIG_FILE} says residual {config.residual!r}; {MODEL_FILE} "
                f"{'lacks' if missing else 'holds'} the residual projections (leak1, leak2) of the other layout")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"holds unknown {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        return f"{MODEL_FILE} {' and '.join(parts)}"
    return None


# ================================================================================================
# TensorFlow tensor bundles (no TensorFlow)
# ================================================================================================
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48
_HEADER_KEY = b""

# tensorflow/core/framework/types.proto DataType -> numpy dtype
_TF_DTYPES = {1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string",
              9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 19: "float16", 22: "uint32",
              23: "uint64"}


# ---- crc32c (Castagnoli), as LevelDB and the bundle use it --------------------------------------
def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c_python(data: bytes) -> int:
    """crc32c in pure Python (about 1 s per 10 MB): the fallback when google-crc32c is missing."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c(data: bytes) -> int:
    try:
        import google_crc32c  # a fast C implementation when installed (a dependency of google-auth)
    except ImportError:
        return crc32c_python(data)
    return int(google_crc32c.value(bytes(data)))


def _unmask_crc(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ---- protobuf wire format ------------------------------------------------------------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ValueError("varint too long")


def _proto_fields(buf: bytes) -> list[tuple[int, int, object]]:
    """Decode one protobuf message into (field number, wire type, value) triples."""
    out, pos = [], 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value = bytes(buf[pos:pos + n])
            pos += n
        elif wire == 5:
            value = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf message")
        out.append((field, wire, value))
    return out


@dataclass
class BundleEntry:
    """One tensor of a bundle (tensorflow/core/protobuf/tensor_bundle.proto BundleEntryProto)."""

    dtype: str
    shape: tuple[int, ...]
    shard_id: int = 0
    offset: int = 0
    size: int = 0
    crc32c: int | None = None   # masked, as stored


def _parse_entry(buf: bytes) -> BundleEntry:
    dtype_code, shape, shard, offset, size, crc = 0, [], 0, 0, 0, None
    for field, _, value in _proto_fields(buf):
        if field == 1:
            dtype_code = value
        elif field == 2:                                   # TensorShapeProto
            for f2, _, v2 in _proto_fields(value):
                if f2 == 2:                                # Dim {size = 1; name = 2}
                    size_dim = 0
                    for f3, _, v3 in _proto_fields(v2):
                        if f3 == 1:
                            size_dim = v3 - (1 << 64) if v3 >= 1 << 63 else v3
                    shape.append(size_dim)
        elif field == 3:
            shard = value
        elif field == 4:
            offset = value
        elif field == 5:
            size = value
        elif field == 6:
            crc = value
        elif field == 7:
            raise ValueError("partitioned (sliced) tensors are not supported")
    return BundleEntry(_TF_DTYPES.get(dtype_code, f"dtype{dtype_code}"), tuple(shape), shard, offset, size, crc)


def _parse_header(buf: bytes) -> dict:
    header = {"num_shards": 1, "endianness": 0}
    for field, _, value in _proto_fields(buf):
        if field == 1:
            header["num_shards"] = value
        elif field == 2:
            header["endianness"] = value
    return header


# ---- LevelDB-format table ------------------------------------------------------------------------
def _read_block(data: bytes, offset: int, size: int, where: str) -> bytes:
    block = data[offset:offset + size]
    trailer = data[offset + size:offset + size + 5]
    if len(block) != size or len(trailer) != 5:
        raise ValueError(f"{where}: truncated table block at offset {offset}")
    if trailer[0] != 0:
        raise ValueError(f"{where}: compressed table blocks (type {trailer[0]}) are not supported")
    stored = struct.unpack("<I", trailer[1:])[0]
    if crc32c(block + trailer[:1]) != _unmask_crc(stored):
        raise ValueError(f"{where}: checksum mismatch in table block at offset {offset}")
    return block


def _block_entries(block: bytes, where: str) -> list[tuple[bytes, bytes]]:
    """Entries of one block: keys are prefix-compressed against the previous key and restart at the
    restart points (where `shared` is 0); the restart array sits at the end of the block."""
    if len(block) < 4:
        raise ValueError(f"{where}: table block too small")
    n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * n_restarts
    if end < 0:
        raise ValueError(f"{where}: bad restart count {n_restarts}")
    restarts = set(struct.unpack_from(f"<{n_restarts}I", block, end))
    entries, pos, key = [], 0, b""
    while pos < end:
        at = pos
        shared, pos = _varint(block, pos)
        non_shared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if at in restarts and shared != 0:
            raise ValueError(f"{where}: restart point with a shared key prefix")
        if shared > len(key):
            raise ValueError(f"{where}: corrupt key prefix")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        value = block[pos:pos + value_len]
        pos += value_len
        if pos > end:
            raise ValueError(f"{where}: truncated table entry")
        entries.append((bytes(key), bytes(value)))
    return entries


def _read_table(data: bytes, where: str) -> list[tuple[bytes, bytes]]:
    if len(data) < _FOOTER_SIZE:
        raise ValueError(f"{where}: too small to be a checkpoint index")
    footer = data[-_FOOTER_SIZE:]
    if struct.unpack("<Q", footer[-8:])[0] != _TABLE_MAGIC:
        raise ValueError(f"{where}: not a TensorFlow checkpoint index (bad table magic)")
    pos = 0
    _meta_offset, pos = _varint(footer, pos)
    _meta_size, pos = _varint(footer, pos)
    index_offset, pos = _varint(footer, pos)
    index_size, pos = _varint(footer, pos)
    index = _block_entries(_read_block(data, index_offset, index_size, where), where)
    entries = []
    for _, handle in index:
        offset, p = _varint(handle, 0)
        size, _ = _varint(handle, p)
        entries.extend(_block_entries(_read_block(data, offset, size, where), where))
    return entries


def _parse_index(data: bytes, where: str) -> tuple[dict, dict[str, BundleEntry]]:
    header, tensors = {"num_shards": 1, "endianness": 0}, {}
    for key, value in _read_table(data, where):
        if key == _HEADER_KEY:
            header = _parse_header(value)
        else:
            tensors[key.decode("utf-8")] = _parse_entry(value)
    if header.get("endianness", 0) != 0:
        raise ValueError(f"{where}: big-endian checkpoints are not supported")
    return header, tensors


# ---- sources: folder, index path, prefix, zip ----------------------------------------------------
class _Source:
    """Reads the index and data shards of one checkpoint from a folder or a zip archive."""

    def __init__(self, src: str | os.PathLike):
        self.src = Path(src)
        self.zip: zipfile.ZipFile | None = None
        if not self.src.exists() and not Path(str(self.src) + ".index").is_file():
            raise FileNotFoundError(f"{self.src}: does not exist")
        if self.src.is_file() and _looks_like_zip(self.src):
            try:
                self.zip = zipfile.ZipFile(self.src)
            except (zipfile.BadZipFile, OSError) as exc:
                raise ValueError(f"{self.src}: zip is corrupt or truncated ({exc})") from None
            indexes = [n for n in self.zip.namelist() if n.endswith(".index")]
            self.index_name = self._pick(indexes)
        elif self.src.is_dir():
            indexes = sorted(str(p) for p in self.src.rglob("*.index"))
            self.index_name = self._pick(indexes)
        elif self.src.suffix == ".index" and self.src.is_file():
            self.index_name = str(self.src)
        elif Path(str(self.src) + ".index").is_file():
            self.index_name = str(self.src) + ".index"
        else:
            raise FileNotFoundError(f"{self.src}: not a checkpoint folder, .index file, prefix or zip")
        self.prefix = self.index_name[: -len(".index")]

    def _pick(self, indexes: list[str]) -> str:
        if not indexes:
            raise FileNotFoundError(f"{self.src}: no *.index file (expected e.g. weights.index)")
        preferred = [n for n in indexes if os.path.basename(n) == "weights.index"]
        if len(preferred) == 1:
            return preferred[0]
        if len(indexes) == 1:
            return indexes[0]
        raise ValueError(f"{self.src}: several checkpoint indexes {indexes}; pass the .index path")

    def read(self, name: str) -> bytes:
        if self.zip is not None:
            try:
                return self.zip.read(name)
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise ValueError(f"{self.src}: zip is corrupt or truncated ({name}: {exc})") from None
        return Path(name).read_bytes()

    def shard_name(self, shard: int, n_shards: int) -> str:
        return f"{self.prefix}.data-{shard:05d}-of-{n_shards:05d}"

    def where(self, name: str) -> str:
        return f"{self.src}:{name}" if self.zip is not None else name


def _looks_like_zip(path: Path) -> bool:
    """A zip, whole or not: its end record (what zipfile looks for) or its first bytes, or its name."""
    if zipfile.is_zipfile(path) or path.suffix.lower() == ".zip":
        return True
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def list_tf_checkpoint(src: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Names -> (dtype, shape) of every entry of a checkpoint index (folder, zip, prefix or .index path)."""
    source = _Source(src)
    _, tensors = _parse_index(source.read(source.index_name), source.where(source.index_name))
    return {name: (e.dtype, e.shape) for name, e in tensors.items()}


def read_tf_checkpoint(src: str | os.PathLike, verify: bool = True) -> dict[str, np.ndarray]:
    """All numeric tensors of a TF2 checkpoint as numpy arrays, bit for bit. String entries (such as
    ``_CHECKPOINTABLE_OBJECT_GRAPH``) are left out. ``verify`` checks each tensor's crc32c."""
    source = _Source(src)
    header, tensors = _parse_index(source.read(source.index_name), source.where(source.index_name))
    n_shards = int(header.get("num_shards", 1))
    shards: dict[int, bytes] = {}
    out = {}
    for name, entry in sorted(tensors.items()):
        if entry.dtype == "string":
            continue
        if entry.dtype.startswith("dtype") or entry.dtype == "bfloat16":
            raise ValueError(f"{name}: unsupported tensor dtype {entry.dtype}")
        if entry.shard_id not in shards:
            shard = source.shard_name(entry.shard_id, n_shards)
            try:
                shards[entry.shard_id] = source.read(shard)
            except (FileNotFoundError, KeyError) as exc:
                raise FileNotFoundError(f"{source.where(shard)}: data shard missing") from exc
        raw = shards[entry.shard_id][entry.offset:entry.offset + entry.size]
        if len(raw) != entry.size:
            raise ValueError(f"{name}: data shard is truncated (wanted {entry.size} bytes at {entry.offset})")
        if verify and entry.crc32c is not None and crc32c(raw) != _unmask_crc(entry.crc32c):
            raise ValueError(f"{name}: crc32c mismatch (corrupt data shard)")
        dtype = np.dtype(entry.dtype).newbyteorder("<")
        arr = np.frombuffer(raw, dtype=dtype).reshape(entry.shape)
        out[name] = arr.astype(arr.dtype.newbyteorder("="), copy=True)
    return out


# ================================================================================================
# Name mapping: official checkpoint keys <-> this model's state_dict
# ================================================================================================
_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"


def _block_names(tf_block: str, sd_block: str, residual: bool) -> dict[str, str]:
    names = {}
    for tf_dense, sd_linear in (("mha/wq", "attention.wq"), ("mha/wk", "attention.wk"),
                                ("mha/wv", "attention.wv"), ("mha/dense", "attention.wo"),
                                ("ffn/layer_with_weights-0", "ffn.fc1"), ("ffn/layer_with_weights-1", "ffn.fc2")):
        names[f"{tf_block}/{tf_dense}/kernel"] = f"{sd_block}.{sd_linear}.weight"
        names[f"{tf_block}/{tf_dense}/bias"] = f"{sd_block}.{sd_linear}.bias"
    for tf_ln, sd_ln in (("layernorm1", "norm1"), ("layernorm2", "norm2")):
        names[f"{tf_block}/{tf_ln}/gamma"] = f"{sd_block}.{sd_ln}.weight"
        names[f"{tf_block}/{tf_ln}/beta"] = f"{sd_block}.{sd_ln}.bias"
    if residual:
        for tf_leak, sd_leak in (("reshape_leak_1", "leak1"), ("reshape_leak_2", "leak2")):
            names[f"{tf_block}/{tf_leak}/kernel"] = f"{sd_block}.{sd_leak}.weight"
            names[f"{tf_block}/{tf_leak}/bias"] = f"{sd_block}.{sd_leak}.bias"
    return names


def tf_name_map(config: ModelConfig) -> dict[str, str]:
    """Official checkpoint key -> state_dict key for a preset's layout.

    Astromer 1 (the MACHO SingleBandEncoder): ``layer_with_weights-0`` is the encoder (with its
    ``inp_transform``), ``layer_with_weights-1`` the regression head (``bn_0`` is a LayerNorm).
    Astromer 2 (the published classifiers): ``layer_with_weights-0`` is the input projection and
    ``layer_with_weights-1`` the encoder blocks; the [MASK] token and reconstruction head are not in them.
    """
    names: dict[str, str] = {}
    residual = config.residual == "projection"
    if config.residual == "none":
        enc = "layer_with_weights-0"
        names[f"{enc}/inp_transform/kernel"] = "encoder.embedding.proj.weight"
        names[f"{enc}/inp_transform/bias"] = "encoder.embedding.proj.bias"
        for i in range(config.n_layers):
            names.update(_block_names(f"{enc}/enc_layers/{i}", f"encoder.blocks.{i}", residual))
        names["layer_with_weights-1/bn_0/gamma"] = "head.norm.weight"
        names["layer_with_weights-1/bn_0/beta"] = "head.norm.bias"
        names["layer_with_weights-1/reg_layer/kernel"] = "head.out.weight"
        names["layer_with_weights-1/reg_layer/bias"] = "head.out.bias"
    else:
        names["layer_with_weights-0/kernel"] = "encoder.embedding.proj.weight"
        names["layer_with_weights-0/bias"] = "encoder.embedding.proj.bias"
        for i in range(config.n_layers):
            names.update(_block_names(f"layer_with_weights-1/enc_layers/{i}", f"encoder.blocks.{i}", residual))
    return {k + _SUFFIX: v for k, v in names.items()}


def _to_torch(tf_name: str, array: np.ndarray) -> torch.Tensor:
    # Dense kernels are [in, out] (y = x @ kernel + b); torch.nn.Linear.weight is [out, in].
    if re.search(r"/kernel/", tf_name):
        array = array.T
    return torch.from_numpy(np.ascontiguousarray(array))


def state_dict_from_tf(tensors: dict[str, np.ndarray], config: ModelConfig, strict: bool = True
                       ) -> dict[str, torch.Tensor]:
    """Map official tensors onto the state_dict of ``Astromer(config)``; checks every name and shape.
    Every mapped tensor must be present; with ``strict`` no other weight may be left unused (optimizer
    slots excepted). Astromer 2 classifier checkpoints hold extra head tensors, so import them non-strict."""
    from astromer.model import Astromer

    mapping = tf_name_map(config)
    expected = Astromer(config).state_dict()
    state = {}
    for tf_name, sd_name in mapping.items():
        if tf_name not in tensors:
            raise KeyError(f"checkpoint has no {tf_name} (needed for {sd_name} of preset {config.name})")
        tensor = _to_torch(tf_name, tensors[tf_name])
        if tuple(tensor.shape) != tuple(expected[sd_name].shape):
            raise ValueError(f"{tf_name}: shape {tuple(tensors[tf_name].shape)} does not fit {sd_name} "
                             f"{tuple(expected[sd_name].shape)} of preset {config.name}")
        state[sd_name] = tensor
    if strict:
        unused = sorted(n for n in tensors if n not in mapping and not n.startswith(("optimizer", "save_counter"))
                        and "OPTIMIZER_SLOT" not in n)
        if unused:
            raise ValueError(f"checkpoint tensors not used by preset {config.name}: {unused[:5]}"
                             f"{' ...' if len(unused) > 5 else ''}")
    return state


def _read_tensors(src: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(src)
    if path.suffix == ".npz" and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise ValueError(f"{path}: .npz (a zip) is corrupt or truncated ({exc})") from None
    return read_tf_checkpoint(path)


def import_official(src: str | os.PathLike, out_dir: str | os.PathLike, preset: str = "astromer1"):
    """Read official weights (checkpoint folder, zip, .index path, or an .npz of the same tensors), map them
    onto the preset and write a model folder. Returns the loaded Astromer."""
    from astromer.model import Astromer

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {sorted(PRESETS)}")
    config = PRESETS[preset]()
    tensors = _read_tensors(src)
    model = Astromer(config)
    state = state_dict_from_tf(tensors, config, strict=config.residual == "none")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"unexpected tensors {unexpected}")
    model.eval()
    save_model(model, out_dir, metadata={"source": Path(src).name, "preset": preset,
                                         "missing_from_source": ",".join(missing)})
    return model


__all__ = ["save_model", "load_model_dir", "read_model_tensors", "read_tf_checkpoint", "list_tf_checkpoint",
           "import_official", "tf_name_map", "state_dict_from_tf", "crc32c"]
