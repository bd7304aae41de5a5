"""The model API: presets, input validation, masking semantics, fast path, embed, skip classifier."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from astromer.config import PRESETS, MaskConfig, ModelConfig, WindowConfig
from astromer.model import Astromer, SkipClassifier
from astromer.windows import curves_windows, probe


def windows_batch(b=3, length=64, n_valid=(64, 40, 7), seed=0):
    rng = np.random.default_rng(seed)
    times = np.zeros((b, length), np.float32)
    mags = np.zeros((b, length), np.float32)
    padding = np.ones((b, length), bool)
    for i, n in enumerate(n_valid):
        t = np.cumsum(rng.uniform(0.1, 2.0, n))
        times[i, :n] = t - t.mean()
        mags[i, :n] = rng.normal(0, 0.3, n)
        padding[i, :n] = False
    return torch.from_numpy(times), torch.from_numpy(mags), torch.from_numpy(padding)


def curves(sizes=(5, 64, 150), seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        mjd = 50_000 + np.cumsum(rng.uniform(0.01, 2, n))
        out.append((mjd, rng.normal(15, 0.2, n).astype(np.float32), rng.uniform(0.01, 0.1, n).astype(np.float32)))
    return out


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Astromer(ModelConfig.tiny()).eval()


def test_presets_round_trip_through_json(tmp_path):
    for name, make in PRESETS.items():
        config = make()
        assert config.name == name
        path = config.to_json(tmp_path / f"{name}.json")
        assert ModelConfig.from_json(path) == config
    a1, a2 = ModelConfig.astromer1(), ModelConfig.astromer2()
    assert (a1.n_layers, a1.d_ff, a1.residual, a1.attention_mask, a1.mask_token, a1.layernorm_eps) == \
        (2, 128, "none", "additive_one", False, 1e-6)
    assert (a2.n_layers, a2.d_ff, a2.residual, a2.attention_mask, a2.mask_token, a2.head_dim) == \
        (6, 512, "projection", "key_neg_inf", True, 64)
    assert MaskConfig() == MaskConfig(0.5, 0.2, 0.2) and WindowConfig().rule == "astromer2"
    with pytest.raises(ValueError, match="window_rule"):
        ModelConfig(window_rule="overlap")
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({**a1.to_dict(), "n_layer": 3})


@pytest.mark.parametrize("case, error, message", [
    ("nan_mag", ValueError, r"mags is not finite \(nan\) at row 1, position 3"),
    ("inf_time", ValueError, r"times is not finite \(inf\) at row 0, position 5"),
    ("unsorted", ValueError, r"unsorted times in row 2"),
    ("duplicate", ValueError, r"duplicate times in row 0"),
    ("empty_row", ValueError, r"row 1 of padding_mask has no real observation"),
    ("int_times", TypeError, r"times must be a floating-point tensor"),
    ("float_padding", TypeError, r"padding_mask must be a bool tensor"),
    ("shape_3d", ValueError, r"mags must have shape \[B, L\]"),
    ("mismatch", ValueError, r"padding_mask has shape \(3, 32\)"),
    ("list", TypeError, r"times must be a torch.Tensor or numpy array"),
])
def test_bad_input_raises_a_named_error(tiny, case, error, message):
    times, mags, padding = windows_batch()
    if case == "nan_mag":
        mags[1, 3] = float("nan")
    elif case == "inf_time":
        times[0, 5] = float("inf")
    elif case == "unsorted":
        times[2, 1], times[2, 2] = times[2, 2].item(), times[2, 1].item()
    elif case == "duplicate":
        times[0, 10] = times[0, 9]
    elif case == "empty_row":
        padding[1] = True
    elif case == "int_times":
        times = times.long()
    elif case == "float_padding":
        padding = padding.float()
    elif case == "shape_3d":
        mags = mags[..., None]
    elif case == "mismatch":
        padding = padding[:, :32]
    elif case == "list":
        times = times.tolist()
    for call in (tiny.encode, tiny.reconstruct, tiny.attention_maps):
        with pytest.raises(error, match=message):
            call(times, mags, padding)


def test_embed_rejects_bad_curves_naming_the_curve(tiny):
    good = curves()
    mjd, mag, err = good[1]
    for bad, message in [((mjd[:0], mag[:0]), "curve 3: empty"),
                         ((mjd, np.where(np.arange(64) == 9, np.nan, mag)), "curve 3: mag is not finite"),
                         ((mjd[::-1].copy(), mag), "curve 3: unsorted times"),
                         ((np.r_[mjd[:5], mjd[4:-1]], mag), "curve 3: duplicate times")]:
        with pytest.raises(ValueError, match=message):
            tiny.embed([*good, bad])
    with pytest.raises(TypeError, match="curve 0"):
        tiny.embed([mjd])


@pytest.mark.parametrize("preset", ["astromer1", "astromer2"])
def test_fast_path_agrees_with_reference_path(preset):
    torch.manual_seed(1)
    model = Astromer(PRESETS[preset]()).eval()
    times, mags, padding = windows_batch(length=200, n_valid=(200, 120, 9))
    hidden = torch.zeros_like(padding)
    hidden[0, ::7] = True
    model.config.attention_impl = "reference"
    ref = model.encode(times, mags, padding, all_layers=True, hidden=hidden)
    ref_rec = model.reconstruct(times, mags, padding)
    model.config.attention_impl = "sdpa"
    fast = model.encode(times, mags, padding, all_layers=True, hidden=hidden)
    fast_rec = model.reconstruct(times, mags, padding)
    for a, b in zip(ref, fast):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-5), (a - b).abs().max()
    assert torch.allclose(ref_rec, fast_rec, atol=2e-5)
    # Gradients agree too (the training path).
    grads = []
    for impl in ("reference", "sdpa"):
        model.config.attention_impl = impl
        model.zero_grad()
        model(times, mags, padding, hidden).pow(2).mean().backward()
        grads.append(model.encoder.blocks[0].attention.wq.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_torch_compile_path_agrees(tiny):
    times, mags, padding = windows_batch()
    expected = tiny.encode(times, mags, padding)
    model = Astromer(tiny.config)
    model.load_state_dict(tiny.state_dict())
    model.eval().compile_encoder(backend="aot_eager")
    assert torch.allclose(model.encode(times, mags, padding), expected, atol=1e-5)
    assert list(model.state_dict()) == list(tiny.state_dict())   # compiling adds nothing to the state


def test_key_masking_hides_padding_and_hidden_observations(tiny):
    times, mags, padding = windows_batch()
    hidden = torch.zeros_like(padding)
    hidden[0, 10:20] = True
    out = tiny.encode(times, mags, padding, hidden=hidden)
    # Changing what sits under padding or under [MASK] changes nothing for the visible observations.
    mags2, times2 = mags.clone(), times.clone()
    mags2[0, 10:20] += 5.0
    mags2[1, 40:] = 3.0
    out2 = tiny.encode(times2, mags2, padding, hidden=hidden)
    visible = ~(padding | hidden)
    assert torch.allclose(out[visible], out2[visible], atol=1e-6)
    maps = tiny.attention_maps(times, mags, padding, hidden=hidden)
    assert len(maps) == tiny.config.n_layers and maps[0].shape == (3, 2, 64, 64)
    assert torch.allclose(maps[0].sum(-1), torch.ones(3, 2, 64), atol=1e-5)
    assert maps[0][0, :, :, 10:20].abs().max() == 0 and maps[0][1, :, :, 40:].abs().max() == 0


def test_all_masked_keys_never_give_nan(tiny):
    times, mags, padding = windows_batch()
    hidden = ~padding            # every real observation hidden: no visible key at all
    for impl in ("reference", "sdpa"):
        tiny.config.attention_impl = impl
        assert torch.isfinite(tiny.encode(times, mags, padding, hidden=hidden)).all()
        assert torch.isfinite(tiny.reconstruct(times, mags, padding, hidden=hidden)).all()
    tiny.config.attention_impl = "sdpa"


def test_mask_token_is_trainable_and_used():
    torch.manual_seed(0)
    model = Astromer(ModelConfig.tiny())
    assert model.encoder.embedding.mask_token.item() == 0.0
    times, mags, padding = windows_batch()
    p = probe(mags.numpy(), padding.numpy(), rng=np.random.default_rng(0))
    rec = model(times, torch.from_numpy(p.mags_in), padding, torch.from_numpy(p.hidden))
    rec[torch.from_numpy(p.probed)].pow(2).mean().backward()
    assert model.encoder.embedding.mask_token.grad.abs() > 0
    # Astromer 1 has no token: hidden magnitudes are zeroed before the projection instead.
    a1 = Astromer(ModelConfig.astromer1())
    assert a1.encoder.embedding.mask_token is None


def test_embed_is_the_mean_over_real_observations_of_all_windows(tiny):
    data = curves()
    emb = tiny.embed(data, batch_size=2)
    assert emb.shape == (3, 32) and emb.dtype == np.float32 and np.isfinite(emb).all()
    w = curves_windows(data, length=64, rule="astromer2")
    h = tiny.encode(torch.from_numpy(w.times), torch.from_numpy(w.mags), torch.from_numpy(w.padding))
    real = torch.from_numpy(~w.padding)[..., None].float()
    sums = (h * real).sum(1)
    for c in range(3):
        rows = torch.from_numpy(w.curve == c)
        want = sums[rows].sum(0) / real[rows].sum()
        np.testing.assert_allclose(emb[c], want.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(tiny.embed(data, batch_size=256), emb, atol=1e-5)
    layers = tiny.embed(data, all_layers=True)
    assert layers.shape == (3, tiny.config.n_layers + 1, 32)
    np.testing.assert_allclose(layers[:, -1], emb, atol=1e-5)
    assert tiny.embed([]).shape == (0, 32)
    assert not tiny.training


def test_skip_classifier_trains_its_head_over_a_frozen_encoder(tiny):
    clf = SkipClassifier(tiny, n_classes=3, hidden=(16, 8))
    assert torch.allclose(clf.head.layer_weights.gamma, torch.full((3,), 1 / 3))
    times, mags, padding = windows_batch()
    logits = clf(times, mags, padding)
    assert logits.shape == (3, 3)
    pooled = clf.pool(times, mags, padding)
    assert pooled.shape == (3, 3, 32)
    assert torch.allclose(clf.head(pooled), logits, atol=1e-6)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    opt = torch.optim.Adam([p for p in clf.parameters() if p.requires_grad], lr=1e-2)
    clf.train()
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(clf(times, mags, padding), torch.tensor([0, 1, 2])).backward()
        opt.step()
    assert not torch.allclose(clf.head.layer_weights.gamma, torch.full((3,), 1 / 3))
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert not tiny.training


def test_fused_qkv_cache_follows_weight_updates():
    torch.manual_seed(0)
    model = Astromer(ModelConfig.tiny()).eval()
    times, mags, padding = windows_batch()
    with torch.inference_mode():
        first = model.encode(times, mags, padding)
    with torch.no_grad():
        model.encoder.blocks[0].attention.wk.weight.mul_(2.0)     # in place, as an optimiser step does
    with torch.inference_mode():
        fast = model.encode(times, mags, padding)
    model.config.attention_impl = "reference"
    reference = model.encode(times, mags, padding)
    assert not torch.allclose(first, fast, atol=1e-3)
    assert torch.allclose(fast, reference, atol=2e-5)


def test_time_attention_init_starts_attention_on_neighbours_in_time():
    from astromer.model import init_time_attention

    torch.manual_seed(0)
    times = torch.cumsum(torch.full((2, 200), 1.5), dim=1)           # an observation every 1.5 days
    mags = torch.randn(2, 200) * 0.1
    padding = torch.zeros(2, 200, dtype=torch.bool)

    def near_share(model):
        with torch.no_grad():
            _, maps = model.encoder(times, mags, padding, need_weights=True, fast=False)
        weights = maps[0][:, 0]                                       # block 1, head 1 (days): [B, L, L]
        distance = (times[:, :, None] - times[:, None, :]).abs()
        return float((weights * (distance <= 3.0)).sum(-1).mean())    # attention within 3 days

    fresh = Astromer(ModelConfig.astromer2()).eval()
    before = near_share(fresh)
    init_time_attention(fresh.encoder, 1.0)
    after = near_share(fresh)
    uniform = 5 / 200                                                 # 5 keys within 3 days of a query
    assert before < 3 * uniform < after
    # only block 1 changed; the parameter set is the same as the official model's
    assert torch.equal(fresh.encoder.blocks[0].attention.wq.weight, torch.eye(256))
    assert not torch.equal(fresh.encoder.blocks[1].attention.wq.weight, torch.eye(256))
