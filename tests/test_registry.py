"""The MLflow registry on a real SQLite tracking store: register, aliases, promotion rule, resolving URIs."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from astromer import registry
from astromer.cli import main as cli_main
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file


def _model_dir(path, seed=0):
    """A folder in the model format (safetensors + config.json); the registry never looks inside."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(4, 4, generator=g)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    return path


def test_names():
    assert registry.pretrained_name("lake1") == "astromer2-lake1"
    assert registry.ASTROMER1_MACHO == "astromer1-macho"
    with pytest.raises(ValueError, match="corpus"):
        registry.pretrained_name("../evil")
    assert registry.parse_model_uri("models:/astromer1-macho@production") == ("astromer1-macho", "production", None)
    assert registry.parse_model_uri("models:/a.b-c/3") == ("a.b-c", None, 3)
    with pytest.raises(ValueError, match="models:/NAME@ALIAS"):
        registry.parse_model_uri("models:/x@")


def test_production_moves_only_on_improvement(tmp_path, mlflow_sqlite):
    name = "astromer2-test"
    v1 = registry.register_model_dir(_model_dir(tmp_path / "a", 1), name, tags={"corpus": "test"},
                                     metrics={"val_rmse": 0.30})
    assert v1 == 1 and registry.production_version(name) == 1
    v2 = registry.register_model_dir(_model_dir(tmp_path / "b", 2), name, metrics={"val_rmse": 0.40})
    client = MlflowClient()
    assert int(client.get_model_version_by_alias(name, "candidate").version) == v2
    assert registry.production_version(name) == 1           # worse: production stays
    v3 = registry.register_model_dir(_model_dir(tmp_path / "c", 3), name, metrics={"val_rmse": 0.25})
    assert registry.production_version(name) == v3 == 3     # better: production moves
    assert client.get_model_version(name, "3").tags["val_rmse"] == "0.25"
    assert client.get_model_version(name, "1").tags["corpus"] == "test"
    assert registry.promote(name, 2, 0.26) is False          # re-promoting an old worse version
    assert registry.production_version(name) == 3
    with pytest.raises(ValueError, match="nan"):
        registry.promote(name, 2, float("nan"))
    # a damaged model is not registered: NaN weights are refused naming the file and tensor
    from safetensors.torch import load_file, save_file

    broken = _model_dir(tmp_path / "d", 4)
    tensors = load_file(str(broken / "model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] * float("nan")
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=f"model.safetensors: tensor {first} has"):
        registry.register_model_dir(broken, name, metrics={"val_rmse": 0.01})
    assert registry.production_version(name) == 3 and len(client.search_model_versions(f"name = '{name}'")) == 3


def test_production_compares_only_versions_scored_on_the_same_validation_windows(tmp_path, mlflow_sqlite, capsys,
                                                                                   caplog):
    name = "astromer2-val"
    registry.register_model_dir(_model_dir(tmp_path / "a", 1), name, tags={"val_set": "aaaa"}, metrics={"val_rmse": 0.30})
    # better figure, other windows (another seed or lake): not comparable, production stays, and says how to move it
    v2 = registry.register_model_dir(_model_dir(tmp_path / "b", 2), name, tags={"val_set": "bbbb"},
                                     metrics={"val_rmse": 0.20})
    assert registry.production_version(name) == 1
    assert f"astromer models alias {name} production {v2}" in caplog.text and "do not compare" in caplog.text
    # the same windows: the better one moves production
    v3 = registry.register_model_dir(_model_dir(tmp_path / "c", 3), name, tags={"val_set": "aaaa"},
                                     metrics={"val_rmse": 0.25})
    assert registry.production_version(name) == v3 == 3
    # by hand, with the command the warning names
    assert cli_main(["models", "alias", name, "production", str(v2)]) == 0
    assert registry.production_version(name) == v2 and f"{name}@production -> version 2" in capsys.readouterr().out
    assert cli_main(["models", "alias", name, "production", "9"]) == 1
    assert "no version 9" in capsys.readouterr().err and registry.production_version(name) == v2
    assert cli_main(["models", "alias", name, "v3", str(v2)]) == 1      # MLflow reserves v<number>
    assert capsys.readouterr().err.startswith("error: alias 'v3':")


def test_resolve_downloads_safetensors_without_unpickling(tmp_path, mlflow_sqlite, monkeypatch):
    name = "astromer1-macho"
    src = _model_dir(tmp_path / "src", 7)
    version = registry.register_model_dir(src, name, tags={"source": "official"})
    assert registry.production_version(name) == version      # first version: production

    def refuse(*args, **kwargs):
        raise AssertionError("resolving a model must not unpickle anything")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for uri in (f"models:/{name}@production", f"models:/{name}/{version}", f"models:/{name}@candidate"):
        folder = registry.resolve_model_dir(uri)
        assert folder.is_relative_to(registry.settings.home())
        assert torch.equal(load_file(str(folder / "model.safetensors"))["w"], load_file(str(src / "model.safetensors"))["w"])
        assert json.loads((folder / "config.json").read_text()) == {"seed": 7}
    with pytest.raises(LookupError, match="no such registered model"):
        registry.resolve_model_dir(f"models:/{name}@nosuchalias")
    with pytest.raises(FileNotFoundError, match="missing model.safetensors"):
        registry.resolve_model_dir(tmp_path)


def test_models_cli(tmp_path, mlflow_sqlite, capsys):
    registry.register_model_dir(_model_dir(tmp_path / "a", 1), "astromer1-macho")
    registry.register_model_dir(_model_dir(tmp_path / "b", 2), "astromer1-macho", metrics={"val_rmse": 0.5})
    assert cli_main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"name": "astromer1-macho", "latest_version": 2, "versions": 2,
                     "aliases": {"candidate": 2, "production": 2}}]
    assert cli_main(["models", "show", "astromer1-macho"]) == 0
    out = capsys.readouterr().out
    assert "version 2" in out and "candidate,production" in out
    assert cli_main(["models", "show", "nope"]) == 1


def test_pyfunc_embeds_curves(tmp_path, mlflow_sqlite):
    """The pyfunc flavour loads the safetensors model and embeds variable-length light curves."""
    import mlflow
    import pandas as pd
    from astromer.config import ModelConfig
    from astromer.model import Astromer
    from astromer.weights import save_model

    torch.manual_seed(0)
    model = Astromer(ModelConfig.tiny()).eval()
    save_model(model, tmp_path / "m")
    version = registry.register_model_dir(tmp_path / "m", "astromer2-pyfunc")
    rng = np.random.default_rng(0)
    curves = []
    for n in (30, 250):
        mjd = np.sort(rng.uniform(50000, 51000, n))
        curves.append((mjd, rng.normal(15, 0.1, n).astype(np.float32), np.full(n, 0.02, np.float32)))
    frame = pd.DataFrame({"mjd": [c[0] for c in curves], "mag": [c[1] for c in curves],
                          "err": [c[2] for c in curves]})
    pyfunc = mlflow.pyfunc.load_model(f"models:/astromer2-pyfunc/{version}")
    out = np.asarray(pyfunc.predict(frame))
    expected = model.embed(curves)
    assert out.shape == (2, model.config.d_model)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_official_import_registers_and_loads_from_production(tmp_path, mlflow_sqlite, monkeypatch, capsys):
    """`astromer weights import ... --register astromer1-macho`, then load_model("models:/...@production")
    reads safetensors + config and never unpickles."""
    import astromer
    from conftest import shared_path

    src = shared_path("reference", "astromer1_macho", "macho_a0.zip")
    assert cli_main(["weights", "import", str(src), str(tmp_path / "a1"), "--register", registry.ASTROMER1_MACHO]) == 0
    assert "registered astromer1-macho version 1" in capsys.readouterr().out
    assert registry.production_version(registry.ASTROMER1_MACHO) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("loading a registered model must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model = astromer.load_model(f"models:/{registry.ASTROMER1_MACHO}@production")
    reference = astromer.load_model(tmp_path / "a1")
    assert model.num_parameters() == 661_505
    for (k, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), k


def test_pyfunc_flavour_embeds_without_any_pickle(tmp_path, mlflow_sqlite, monkeypatch):
    """The pyfunc wrapper is stored as code (no python_model.pkl) and mlflow.pyfunc.load_model embeds curves."""
    import mlflow
    from astromer.config import ModelConfig
    from astromer.model import Astromer
    from astromer.weights import save_model

    torch.manual_seed(0)
    model = Astromer(ModelConfig.tiny()).eval()
    save_model(model, tmp_path / "tiny")
    version = registry.register_model_dir(tmp_path / "tiny", "astromer2-pyfunc")
    local = mlflow.artifacts.download_artifacts(f"models:/astromer2-pyfunc/{version}", dst_path=str(tmp_path / "dl"))
    stored = {p.name for p in (tmp_path / "dl").rglob("*")}
    assert not any(name.endswith((".pkl", ".pickle", ".cloudpickle")) for name in stored), stored

    def refuse(*args, **kwargs):
        raise AssertionError("loading the pyfunc model must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    pyfunc = mlflow.pyfunc.load_model(local)
    rng = np.random.default_rng(0)
    curves = [(np.sort(rng.uniform(0, 300, n)), rng.normal(0, 0.3, n).astype(np.float32)) for n in (30, 250)]
    got = np.asarray(pyfunc.predict(curves))
    assert got.shape == (2, model.config.d_model) and np.isfinite(got).all()
    np.testing.assert_allclose(got, model.embed(curves), atol=1e-5)
