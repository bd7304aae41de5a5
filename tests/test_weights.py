"""Model folders (safetensors + JSON) and the TensorFlow-free checkpoint reader and import command."""
from __future__ import annotations

import json
import os
import re
import zipfile

import astromer
import numpy as np
import pytest
import torch
from astromer.cli import main as cli
from astromer.config import ModelConfig
from astromer.model import Astromer
from astromer.weights import (
    crc32c,
    crc32c_python,
    import_official,
    list_tf_checkpoint,
    load_model_dir,
    read_tf_checkpoint,
    save_model,
)
from conftest import shared_path
from mlflow.tracking import MlflowClient

ZIP = ("reference", "astromer1_macho", "macho_a0.zip")
NPZ = ("reference", "astromer1_macho", "astromer1_macho_weights.npz")


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    with zipfile.ZipFile(shared_path(*ZIP)) as zf:
        for name in ("macho/weights.index", "macho/weights.data-00000-of-00001", "macho/checkpoint"):
            (out / name.split("/")[1]).write_bytes(zf.read(name))
    return out


def reference_tensors():
    with np.load(shared_path(*NPZ)) as npz:
        return {k: npz[k] for k in npz.files}


def test_crc32c_known_vectors():
    assert crc32c(b"123456789") == crc32c_python(b"123456789") == 0xE3069283
    assert crc32c(b"") == crc32c_python(b"") == 0
    data = np.random.default_rng(0).bytes(5000)
    assert crc32c(data) == crc32c_python(data)


@pytest.mark.parametrize("form", ["folder", "index", "prefix", "zip"])
def test_reader_accepts_folder_index_prefix_and_zip(checkpoint_folder, form):
    src = {"folder": checkpoint_folder, "index": checkpoint_folder / "weights.index",
           "prefix": checkpoint_folder / "weights", "zip": shared_path(*ZIP)}[form]
    tensors = read_tf_checkpoint(src)
    ref = reference_tensors()
    assert sorted(tensors) == sorted(ref)
    assert all(tensors[k].tobytes() == ref[k].tobytes() for k in ref)
    listed = list_tf_checkpoint(src)
    assert listed["_CHECKPOINTABLE_OBJECT_GRAPH"][0] == "string"
    assert listed["layer_with_weights-1/reg_layer/kernel/.ATTRIBUTES/VARIABLE_VALUE"] == ("float32", (256, 1))


def test_corrupt_data_and_index_are_detected(checkpoint_folder, tmp_path):
    for name in ("weights.index", "weights.data-00000-of-00001"):
        (tmp_path / name).write_bytes((checkpoint_folder / name).read_bytes())
    data = bytearray((tmp_path / "weights.data-00000-of-00001").read_bytes())
    data[1000] ^= 0x01
    (tmp_path / "weights.data-00000-of-00001").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="crc32c mismatch"):
        read_tf_checkpoint(tmp_path)
    index = bytearray((checkpoint_folder / "weights.index").read_bytes())
    index[100] ^= 0x01
    (tmp_path / "weights.index").write_bytes(bytes(index))
    with pytest.raises(ValueError, match="checksum mismatch"):
        list_tf_checkpoint(tmp_path)
    (tmp_path / "weights.index").write_bytes(bytes(index[:-10]))
    with pytest.raises(ValueError, match="not a TensorFlow checkpoint index"):
        list_tf_checkpoint(tmp_path)
    (tmp_path / "weights.index").write_bytes((checkpoint_folder / "weights.index").read_bytes())
    (tmp_path / "weights.data-00000-of-00001").unlink()
    with pytest.raises(FileNotFoundError, match="data shard missing"):
        read_tf_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing-here: does not exist"):
        read_tf_checkpoint(tmp_path / "nothing-here")
    # a zip cut short (no end record), or with a damaged member
    whole = shared_path(*ZIP).read_bytes()
    (tmp_path / "cut.zip").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "cut").write_bytes(whole[:len(whole) // 2])     # known by its first bytes, whatever its name
    for cut in ("cut.zip", "cut"):
        with pytest.raises(ValueError, match=f"{cut}: zip is corrupt or truncated"):
            read_tf_checkpoint(tmp_path / cut)
    damaged = bytearray(whole)
    damaged[len(whole) // 2] ^= 0xFF
    (tmp_path / "damaged.zip").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="damaged.zip: zip is corrupt or truncated"):
        read_tf_checkpoint(tmp_path / "damaged.zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.index"):
        read_tf_checkpoint(tmp_path / "empty")


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Astromer(ModelConfig.tiny()).eval()
    with torch.no_grad():
        model.encoder.embedding.mask_token.fill_(0.25)
    save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    mask = os.umask(0o022)
    os.umask(mask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~mask   # not mkstemp's 0600
    loaded = astromer.load_model(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # A folder whose config does not match its tensors is refused, naming the file.
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["d_ff"] = 16
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.safetensors: does not match"):
        load_model_dir(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        astromer.load_model(tmp_path / "m")


def _damage(folder, case):
    """Damage a tiny model folder the way a copy, an edit or another preset's file does."""
    config = json.loads((folder / "config.json").read_text())
    tensors = folder / "model.safetensors"
    if case == "other preset":
        config = ModelConfig.astromer1().to_dict()
    elif case == "more layers":
        config["n_layers"] = 3
    elif case == "truncated":
        tensors.write_bytes(tensors.read_bytes()[:-100])
    elif case == "garbled header":
        data = bytearray(tensors.read_bytes())
        data[20:60] = bytes(40)
        tensors.write_bytes(bytes(data))
    elif case == "json syntax":
        (folder / "config.json").write_text(json.dumps(config, indent=2).replace('"d_ff"', '"d_ff",', 1))
        return
    elif case == "not a mapping":
        config = [config]
    else:
        key, value = {"d_ff text": ("d_ff", "big"), "unknown key": ("colour", "red"), "no heads": ("n_heads", 0),
                      "dropout text": ("dropout", "x")}[case]
        config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("case, file, words", [
    ("other preset", "model.safetensors", "config.json says d_model 256; model.safetensors holds 32 "
                                          "(encoder.embedding.proj.weight)"),
    ("more layers", "model.safetensors", "config.json says n_layers 3; model.safetensors holds 2 blocks"),
    ("truncated", "model.safetensors", "not a readable safetensors file"),
    ("garbled header", "model.safetensors", "not a readable safetensors file"),
    ("json syntax", "config.json", "not valid JSON: Expecting ':' delimiter: line 4 column 9"),
    ("not a mapping", "config.json", "expected a mapping"),
    ("d_ff text", "config.json", "ModelConfig.d_ff='big': expected a positive integer"),
    ("unknown key", "config.json", "unknown field(s) ['colour']"),
    ("no heads", "config.json", "ModelConfig.n_heads=0: expected a positive integer"),
    ("dropout text", "config.json", "ModelConfig.dropout='x': expected a number"),
])
def test_a_damaged_model_folder_is_refused_in_one_error_naming_the_file(tmp_path, case, file, words):
    from astromer.registry import resolve_model_dir

    folder = save_model(Astromer(ModelConfig.tiny()), tmp_path / "m")
    _damage(folder, case)
    with pytest.raises(ValueError) as caught:
        load_model_dir(folder)
    message = str(caught.value)
    assert message.startswith(f"{folder / file}: ") and words in message and "\n" not in message, message
    # a job's pre-flight loads the folder it resolves
    assert resolve_model_dir(folder) == folder
    with pytest.raises(ValueError, match=re.escape(words)):
        resolve_model_dir(folder, check=True)


def test_a_model_file_with_non_finite_values_is_refused_naming_the_tensor(tmp_path):
    """Bytes overwritten with 0xff inside model.safetensors read as NaN: every embedding would be NaN."""
    from astromer.registry import resolve_model_dir

    folder = save_model(Astromer(ModelConfig.tiny()), tmp_path / "m")
    tensors = folder / "model.safetensors"
    name = "encoder.blocks.1.attention.wq.weight"
    # the file: 8 bytes of header length, the JSON header (each tensor's data offsets), then the data
    header_len = int.from_bytes(tensors.read_bytes()[:8], "little")
    offsets = json.loads(tensors.read_bytes()[8:8 + header_len])[name]["data_offsets"]
    data = bytearray(tensors.read_bytes())
    start = 8 + header_len + offsets[0]
    data[start:start + 400] = b"\xff" * 400          # 100 float32 values, each a NaN
    tensors.write_bytes(bytes(data))
    message = f"{tensors}: tensor {name} has 100 non-finite values"
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        load_model_dir(folder)
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_model_dir(folder, check=True)


def test_import_from_npz_equals_import_from_zip(tmp_path):
    a = import_official(shared_path(*ZIP), tmp_path / "zip")
    b = import_official(shared_path(*NPZ), tmp_path / "npz")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    # The kernel transpose: torch weight [out, in] = TF kernel [in, out].T
    ref = reference_tensors()
    key = "layer_with_weights-0/enc_layers/1/mha/wq/kernel/.ATTRIBUTES/VARIABLE_VALUE"
    assert np.array_equal(a.encoder.blocks[1].attention.wq.weight.detach().numpy(), ref[key].T)
    with pytest.raises(ValueError, match="unknown preset"):
        import_official(shared_path(*NPZ), tmp_path / "x", preset="astromer3")
    with pytest.raises(KeyError, match="checkpoint has no layer_with_weights-0/kernel"):
        import_official(shared_path(*NPZ), tmp_path / "x", preset="astromer2")
    bad = reference_tensors()
    bad["layer_with_weights-1/reg_layer/kernel/.ATTRIBUTES/VARIABLE_VALUE"] = np.zeros((128, 1), np.float32)
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError, match="does not fit head.out.weight"):
        import_official(tmp_path / "bad.npz", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_import_list_and_register(tmp_path, mlflow_sqlite, capsys):
    out = tmp_path / "macho"
    assert cli(["weights", "import", str(shared_path(*ZIP)), str(out), "--register", "astromer1-macho"]) == 0
    printed = capsys.readouterr()
    assert "661,505 parameters" in printed.out and "registered astromer1-macho version 1" in printed.out
    assert "lacks" not in printed.err   # the MACHO checkpoint holds every tensor, its head included
    printed = printed.out
    model = astromer.load_model("models:/astromer1-macho@candidate")
    assert model.num_parameters() == 661_505 and model.config.window_rule == "astromer1"
    # the lineage tag names the checkpoint by its absolute path, whatever folder the command ran in
    version = MlflowClient().get_model_version("astromer1-macho", "1")
    assert version.tags["source"] == str(shared_path(*ZIP).resolve())
    # the same checkpoint again adds no version
    assert cli(["weights", "import", str(shared_path(*ZIP)), str(out), "--register", "astromer1-macho"]) == 0
    assert "version 1 holds these weights already" in capsys.readouterr().out
    assert [int(v.version) for v in MlflowClient().search_model_versions("name = 'astromer1-macho'")] == [1]
    assert cli(["weights", "import", str(shared_path(*NPZ)), str(tmp_path / "a2"), "--preset", "astromer2"]) == 1
    assert capsys.readouterr().err.startswith("astromer weights import: checkpoint has no")
    assert cli(["weights", "list", str(shared_path("reference", "astromer2_classifier_index", "weights.index")),
                "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["layer_with_weights-2/gamma/.ATTRIBUTES/VARIABLE_VALUE"]["shape"] == [7]
    # a name the registry cannot take is refused before the model folder is written
    assert cli(["weights", "import", str(shared_path(*NPZ)), str(tmp_path / "named"), "--register", "Bad Name!"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --register: model name 'Bad Name!' must be letters, digits, '.', '_' or '-'\n", err
    assert not (tmp_path / "named").exists()
    assert cli(["weights", "import", str(tmp_path / "missing.zip"), str(tmp_path / "x")]) == 1
    assert f"{tmp_path / 'missing.zip'}: does not exist" in capsys.readouterr().err
    (tmp_path / "cut.zip").write_bytes(shared_path(*ZIP).read_bytes()[:100_000])
    assert cli(["weights", "import", str(tmp_path / "cut.zip"), str(tmp_path / "x")]) == 1
    assert f"{tmp_path / 'cut.zip'}: zip is corrupt or truncated" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # the digest of a model's tensors: the same for the same weights written twice, another for others
    assert cli(["weights", "import", str(shared_path(*NPZ)), str(tmp_path / "again")]) == 0
    capsys.readouterr()
    assert cli(["weights", "digest", str(out), str(tmp_path / "again"), str(tmp_path / "a2")]) == 2
    assert "no model.safetensors in " + str(tmp_path / "a2") in capsys.readouterr().err
    model = astromer.load_model(str(out))
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    save_model(model, tmp_path / "changed")
    assert cli(["weights", "digest", str(out), str(tmp_path / "again"), str(tmp_path / "changed")]) == 0
    digests = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert len(digests) == 3 and digests[0] == digests[1] != digests[2]


def test_astromer2_import_maps_every_official_encoder_tensor(tmp_path, capsys):
    """Official Astromer 2 names and shapes (from the published classifier index) with random values:
    each lands, transposed where it is a kernel, in the right place; the classifier's own tensors are
    ignored and the [MASK] token and reconstruction head keep their initial values."""
    variables = json.loads(shared_path("reference", "astromer2_classifier_index", "variables.json").read_text())
    rng = np.random.default_rng(0)
    tensors = {v["name"]: rng.normal(size=v["shape"]).astype(np.float32) for v in variables["variables"]}
    np.savez(tmp_path / "a2.npz", **tensors)
    model = import_official(tmp_path / "a2.npz", tmp_path / "a2", preset="astromer2")
    block = model.encoder.blocks[5]
    prefix = "layer_with_weights-1/enc_layers/5/"
    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    pairs = [(block.leak1.weight, "reshape_leak_1/kernel", True), (block.leak2.bias, "reshape_leak_2/bias", False),
             (block.attention.wo.weight, "mha/dense/kernel", True), (block.ffn.fc1.weight, "ffn/layer_with_weights-0/kernel", True),
             (block.norm2.weight, "layernorm2/gamma", False)]
    for param, name, kernel in pairs:
        want = tensors[prefix + name + suffix]
        assert np.array_equal(param.detach().numpy(), want.T if kernel else want), name
    assert np.array_equal(model.encoder.embedding.proj.weight.detach().numpy(),
                          tensors["layer_with_weights-0/kernel" + suffix].T)
    assert model.encoder.embedding.mask_token.item() == 0.0
    reloaded = astromer.load_model(tmp_path / "a2")
    assert reloaded.config.residual == "projection" and reloaded.num_parameters("encoder") == 3_952_640
    # the command says which tensors the classifier checkpoint lacks (the [MASK] token, the head)
    assert cli(["weights", "import", str(tmp_path / "a2.npz"), str(tmp_path / "a2-cli"), "--preset", "astromer2"]) == 0
    err = capsys.readouterr().err
    assert "the checkpoint lacks" in err and "mask_token" in err and "head" in err, err
