"""Parity with the official Astromer 1 (ASTROMER 0.1.8 + the published MACHO weights).

The reference outputs in ../shared/reference/astromer1_macho were produced by the official TensorFlow code;
the tolerances are those its README derives for a float32 re-implementation.
"""
from __future__ import annotations

import json
import tarfile

import astromer
import numpy as np
import pytest
import torch
from astromer.config import ModelConfig
from astromer.model import Astromer
from astromer.weights import import_official, list_tf_checkpoint, read_tf_checkpoint, tf_name_map
from astromer.windows import curve_windows
from conftest import shared_path

REF = ("reference", "astromer1_macho")


@pytest.fixture(scope="module")
def reference():
    with np.load(shared_path(*REF, "reference_macho_lcs.npz")) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def intermediates():
    with np.load(shared_path(*REF, "reference_intermediates.npz")) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def macho_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("astromer1_macho")
    import_official(shared_path(*REF, "macho_a0.zip"), out, preset="astromer1")
    model = astromer.load_model(out)
    model.config.attention_impl = "reference"
    return model


def fed(reference, rows=slice(None)):
    """The arrays the official pipeline fed to the encoder, as the model's [B, L] inputs."""
    times = torch.from_numpy(reference["win_times"][rows, :, 0])
    mags = torch.from_numpy(reference["win_input"][rows, :, 0])
    padding = torch.from_numpy(reference["win_mask_in"][rows, :, 0] > 0.5)
    return times, mags, padding


def read_macho_tar(path):
    """(series name, [n, 3] float64 MJD/mag/err) for each .mjd file of one MACHO archive (test-local
    reader so this test does not depend on the lake's survey readers)."""
    series = []
    with tarfile.open(path, "r:bz2") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if not member.name.endswith(".mjd"):
                continue
            text = tar.extractfile(member).read().decode("ascii")
            rows = [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]
            name = member.name.rsplit("/", 1)[-1][: -len(".mjd")]
            series.append((name, np.array(rows, dtype=np.float64)))
    return series


def test_import_of_published_zip_is_bit_identical():
    ours = read_tf_checkpoint(shared_path(*REF, "macho_a0.zip"))
    with np.load(shared_path(*REF, "astromer1_macho_weights.npz")) as npz:
        assert sorted(ours) == sorted(npz.files)
        for key in npz.files:
            assert ours[key].dtype == npz[key].dtype and ours[key].shape == npz[key].shape, key
            assert ours[key].tobytes() == npz[key].tobytes(), key
    meta = json.loads(shared_path(*REF, "astromer1_macho_variables.json").read_text())
    assert sum(a.size for a in ours.values()) == meta["total_params"] == 661_505


def test_parameter_counts_and_astromer2_names_match_official_index():
    assert Astromer(ModelConfig.astromer1()).num_parameters() == 661_505
    a2 = Astromer(ModelConfig.astromer2())
    assert a2.num_parameters("encoder") == 3_952_640
    assert a2.num_parameters() == 3_953_410   # + [MASK] token (1) + reconstruction head (769)

    index = shared_path("reference", "astromer2_classifier_index", "weights.index")
    variables = json.loads(index.with_name("variables.json").read_text())
    listed = list_tf_checkpoint(index)
    for entry in variables["variables"]:
        assert listed[entry["name"]] == ("float32", tuple(entry["shape"])), entry["name"]
    assert sum(int(np.prod(listed[e["name"]][1])) for e in variables["variables"]) == variables["total_params"]

    # Every encoder tensor of the official Astromer 2 maps onto our state_dict with the right shape.
    state = a2.state_dict()
    mapping = tf_name_map(a2.config)
    encoder_names = [e["name"] for e in variables["variables"]
                     if e["name"].startswith(("layer_with_weights-0/", "layer_with_weights-1/"))]
    assert sorted(mapping) == sorted(encoder_names)
    total = 0
    for tf_name, sd_name in mapping.items():
        tf_shape = listed[tf_name][1]
        expected = tf_shape[::-1] if "/kernel/" in tf_name else tf_shape
        assert tuple(state[sd_name].shape) == expected, (tf_name, sd_name)
        total += state[sd_name].numel()
    assert total == variables["input_projection_and_encoder_params"] == 3_952_640


@pytest.mark.parametrize("impl", ["reference", "sdpa"])
def test_encode_matches_official_embeddings(macho_model, reference, impl):
    macho_model.config.attention_impl = impl
    try:
        emb = macho_model.encode(*fed(reference))
    finally:
        macho_model.config.attention_impl = "reference"
    emb = emb.detach().numpy()
    for got, want in ((emb[reference["first_win_row"]], reference["first_win_emb"]),
                      (emb[reference["full_emb_rows"]], reference["full_emb"])):
        diff = np.abs(got - want)
        assert diff.max() < 2e-3 and diff.mean() < 1e-5, (diff.max(), diff.mean())
    real = (reference["win_mask_in"][:, :, 0] < 0.5)[:, :, None]
    pooled = (emb * real).sum(1) / real.sum(1)
    diff = np.abs(pooled - reference["win_emb_mean_valid"])
    assert diff.max() < 2e-3 and diff.mean() < 1e-5


def test_reconstruct_matches_official_regression_head(macho_model, reference):
    recon = macho_model.reconstruct(*fed(reference)).detach().numpy()
    assert np.abs(recon - reference["win_recon"][:, :, 0]).max() < 2e-4


def test_layer_by_layer_matches_official_intermediates(macho_model, intermediates):
    ref = {k: torch.from_numpy(v) for k, v in intermediates.items()}
    enc = macho_model.encoder
    times, mags = ref["times"][..., 0], ref["input"][..., 0]
    padding = ref["mask_in"][..., 0] > 0.5

    def close(got, key, atol):
        # Relative to the tensor's scale (MHA outputs reach ~1e3 before the LayerNorm).
        diff = (got.detach() - ref[key]).abs().max().item()
        bound = atol * max(1.0, ref[key].abs().max().item())
        assert diff < bound, f"{key}: max |diff| {diff} >= {bound}"

    with torch.no_grad():
        close(enc.positional(times), "pos_encoding", 5e-4)
        close(enc.embedding.proj(mags[..., None]), "inp_transform", 1e-5)
        close(enc.embedding(mags, None) + enc.positional(times), "x0", 5e-4)
        bias = enc.attention_bias(padding)
        block_in = ref["x0"]
        for i, block in enumerate(enc.blocks):
            close(block.attention.wq(block_in), f"l{i}_q", 1e-5)
            mha_out, weights = block.attention(block_in, bias, fast=False, need_weights=True)
            close(weights, f"l{i}_attn_weights", 1e-5)
            close(mha_out, f"l{i}_mha_out", 1e-5)
            close(block.norm1(ref[f"l{i}_mha_out"]), f"l{i}_ln1_out", 1e-5)
            hidden = torch.tanh(block.ffn.fc1(ref[f"l{i}_ln1_out"]))
            close(hidden, f"l{i}_ffn_hidden", 1e-5)
            close(block.ffn.fc2(ref[f"l{i}_ffn_hidden"]), f"l{i}_ffn_out", 1e-5)
            close(block.norm2(ref[f"l{i}_ffn_out"]), f"l{i}_out", 1e-5)
            block_in = ref[f"l{i}_out"]
        close(macho_model.head.norm(ref["encoder_out"]), "reg_ln_out", 1e-5)
        close(macho_model.head.out(ref["reg_ln_out"]), "recon", 1e-5)
        # And the whole chain from the fed arrays.
        hs, maps = macho_model.encode(times, mags, padding, all_layers=True, return_attention=True)
    assert len(hs) == 3 and len(maps) == 2 and maps[0].shape == (2, 4, 200, 200)
    close(hs[-1], "encoder_out", 2e-3)
    close(maps[0], "l0_attn_weights", 1e-5)
    # The +1 padding mask really is the official one: real queries of the short window look at padding.
    on_padding = maps[0][1, :, :45, 45:].sum(-1)                 # [heads, 45 real queries]
    assert on_padding.mean() > 0.85 and on_padding.min() > 0.6


def test_raw_macho_files_reproduce_fed_windows_and_embeddings(macho_model, reference):
    series = [s for path in sorted(shared_path("data", "macho_sample").glob("*.tar.bz2"))
              for s in read_macho_tar(path)]
    names = [name for name, _ in series]
    assert names == list(reference["series_names"])
    offsets = reference["raw_lc_offsets"]
    curves = []
    for s, (_, data) in enumerate(series):
        np.testing.assert_array_equal(data, reference["raw_lc_concat"][offsets[s]:offsets[s + 1]])
        windows = curve_windows(data[:, 0], data[:, 1], data[:, 2], length=200, rule="astromer1")
        rows = np.where(reference["win_series_idx"] == s)[0]
        assert len(windows) == len(rows)
        np.testing.assert_array_equal(windows.start, reference["win_pivot"][rows])
        np.testing.assert_array_equal(windows.n_valid, reference["win_n_valid"][rows])
        # Bit for bit: the same float32 arithmetic as the official pipeline.
        assert windows.times.tobytes() == reference["win_times"][rows, :, 0].tobytes()
        assert windows.mags.tobytes() == reference["win_input"][rows, :, 0].tobytes()
        np.testing.assert_array_equal(windows.padding, reference["win_mask_in"][rows, :, 0] > 0.5)
        curves.append((data[:, 0], data[:, 1], data[:, 2]))

    # The same embeddings follow: per-curve means over the real rows of all windows.
    got = macho_model.embed(curves, batch_size=32)
    weights = reference["win_n_valid"].astype(np.float64)
    for s in range(len(curves)):
        rows = reference["win_series_idx"] == s
        want = (reference["win_emb_mean_valid"][rows] * weights[rows, None]).sum(0) / weights[rows].sum()
        assert np.abs(got[s] - want).max() < 2e-3
    layers = macho_model.embed(curves[:2], all_layers=True)
    assert layers.shape == (2, 3, 256)
    np.testing.assert_allclose(layers[:, -1], got[:2], atol=1e-5)
