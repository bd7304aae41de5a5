"""The Astromer encoder, its reconstruction head and the `skip` classifier, in one file.

One configurable model reproduces both published ones (see astromer.config presets):

  Astromer 1 (ASTROMER 0.1.8, the MACHO weights)      Astromer 2 (official main-code)
  ---------------------------------------------      -------------------------------
  2 blocks, FFN 128 tanh                              6 blocks, FFN 512 tanh
  no residual connections                             learned residual projections (reshape_leak_1/2)
  padding adds +1 to the attention logits             masked keys get -1e9 (never NaN, see below)
  no [MASK] token (hidden magnitudes are zeroed)      a trainable scalar [MASK] token

Shapes: B windows, L observations per window, D = d_model, H heads of size Dh = D / H.
``padding`` is bool [B, L] with True on padding rows; ``hidden`` is bool [B, L] with True where the
pretraining task hides a magnitude. Both are "masked" for attention (``mask_in`` in the TF code).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from astromer.config import ModelConfig
from astromer.windows import Windows, curves_windows, precision_hint

# Logit added to a masked key with key masking. Finite, so a row whose keys are all masked still gets a
# (uniform) softmax instead of NaN; exp(-1e9) is exactly 0 next to any real logit, as with -inf.
MASKED_LOGIT = -1e9


class PositionalEncoding(nn.Module):
    """PE[t, j] = sin(t * w_j) on even j, cos(t * w_j) on odd j, with one frequency per dimension,
    w_j = 1 / base^(2j / D), computed in float32 from the centred time t in days (as the TF code did)."""

    def __init__(self, d_model: int, base: float = 10000.0):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"d_model={d_model}: the positional encoding needs an even size")
        j = torch.arange(d_model, dtype=torch.float32)
        omega = 1.0 / torch.pow(torch.tensor(base, dtype=torch.float32), 2.0 * j / d_model)  # [D]
        self.register_buffer("omega_even", omega[0::2].clone(), persistent=False)            # [D/2]
        self.register_buffer("omega_odd", omega[1::2].clone(), persistent=False)             # [D/2]

    def forward(self, times: Tensor) -> Tensor:
        t = times.float().unsqueeze(-1)                        # [B, L, 1]
        # out= below supports neither autograd nor torch.compile (a graph break per call)
        if (t.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return torch.stack((torch.sin(t * self.omega_even), torch.cos(t * self.omega_odd)), -1).flatten(-2)
        pe = t.new_empty(*times.shape, 2 * self.omega_even.numel())                    # [B, L, D]
        torch.sin(t * self.omega_even, out=pe[..., 0::2])      # even dims 0, 2, 4, ...
        torch.cos(t * self.omega_odd, out=pe[..., 1::2])       # odd dims 1, 3, 5, ...
        return pe


class MagnitudeEmbedding(nn.Module):
    """Dense 1 -> D of the (centred) magnitude; masked magnitudes are replaced first: by the trainable
    [MASK] scalar (zero-initialised, Astromer 2) or by 0 (Astromer 1, which has no token)."""

    def __init__(self, d_model: int, mask_token: bool):
        super().__init__()
        self.proj = nn.Linear(1, d_model)
        self.mask_token = nn.Parameter(torch.zeros(())) if mask_token else None

    def forward(self, mags: Tensor, replace: Tensor | None, add_to: Tensor | None = None) -> Tensor:
        # mags [B, L], replace bool [B, L] or None; add_to [B, L, D] (the positional encoding) or None
        if replace is not None:
            token = self.mask_token if self.mask_token is not None else mags.new_zeros(())
            mags = torch.where(replace, token.to(mags.dtype), mags)
        if add_to is None or torch.is_grad_enabled():
            out = self.proj(mags.unsqueeze(-1))                # [B, L, D]
            return out if add_to is None else out + add_to
        # Inference: accumulate into add_to in place (two passes over [B, L, D] instead of four).
        return add_to.add_(self.proj.bias).addcmul_(mags.unsqueeze(-1), self.proj.weight[:, 0])


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over H heads with an additive logit bias (the mask)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.wq = nn.Linear(d_model, d_model)
        self.wk = nn.Linear(d_model, d_model)
        self.wv = nn.Linear(d_model, d_model)
        self.wo = nn.Linear(d_model, d_model)                  # TF: mha/dense (the "MixerDense")
        self._qkv_cache: tuple | None = None

    def qkv_weights(self) -> tuple[Tensor, Tensor]:
        """Q, K and V weights stacked for one matmul, [3D, D] and [3D]. Without autograd the stack is
        cached and rebuilt only when a weight changes (in-place updates bump the tensor version)."""
        params = (self.wq.weight, self.wk.weight, self.wv.weight, self.wq.bias, self.wk.bias, self.wv.bias)
        # Under torch.compile the stack is part of the graph (a cached tensor made there would be a graph
        # output: with CUDA graphs the next replay overwrites it).
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return torch.cat(params[:3]), torch.cat(params[3:])
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        if self._qkv_cache is None or self._qkv_cache[0] != key:
            with torch.no_grad():
                self._qkv_cache = (key, torch.cat(params[:3]), torch.cat(params[3:]))
        return self._qkv_cache[1], self._qkv_cache[2]

    def forward(self, x: Tensor, bias: Tensor | None, fast: bool = True, need_weights: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        b, length, d = x.shape                                 # x [B, L, D]; bias [B, 1, L|1, L] or None
        if fast:
            # One matmul for Q, K and V (the same weights, concatenated).
            w, bias_qkv = self.qkv_weights()
            q, k, v = F.linear(x, w, bias_qkv).split(d, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)

        def heads(t: Tensor) -> Tensor:                        # [B, L, D] -> [B, H, L, Dh]
            return t.view(b, length, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        weights = None
        if fast and not need_weights:
            mask = None if bias is None else bias.to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            logits = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)          # [B, H, L, L]
            if bias is not None:
                logits = logits + bias
            weights = torch.softmax(logits, dim=-1)
            y = weights @ v                                    # [B, H, L, Dh]
        y = y.transpose(1, 2).reshape(b, length, d)            # merge heads: [B, L, D]
        return self.wo(y), weights


class FeedForward(nn.Module):
    """Dense D -> d_ff with the activation (tanh in both published models), then d_ff -> D."""

    def __init__(self, d_model: int, d_ff: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.act = {"tanh": torch.tanh, "relu": F.relu, "gelu": F.gelu}[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))                 # [B, L, D]


class EncoderBlock(nn.Module):
    """Post-LN block. Without residuals (Astromer 1): out = LN2(FFN(LN1(MHA(x)))).
    With projection residuals (Astromer 2): a = LN1(leak1(x) + MHA(x)); out = LN2(leak2(a) + FFN(a))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.d_model
        self.attention = MultiHeadAttention(d, config.n_heads)
        self.norm1 = nn.LayerNorm(d, eps=config.layernorm_eps)
        self.ffn = FeedForward(d, config.d_ff, config.ffn_activation)
        self.norm2 = nn.LayerNorm(d, eps=config.layernorm_eps)
        self.dropout1 = nn.Dropout(config.dropout)
        self.dropout2 = nn.Dropout(config.dropout)
        projection = config.residual == "projection"
        self.leak1 = nn.Linear(d, d) if projection else None   # TF: reshape_leak_1
        self.leak2 = nn.Linear(d, d) if projection else None   # TF: reshape_leak_2

    def forward(self, x: Tensor, bias: Tensor | None, fast: bool = True, need_weights: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        attended, weights = self.attention(x, bias, fast=fast, need_weights=need_weights)
        attended = self.dropout1(attended)
        a = self.norm1(attended if self.leak1 is None else self.leak1(x) + attended)
        f = self.dropout2(self.ffn(a))
        out = self.norm2(f if self.leak2 is None else self.leak2(a) + f)
        return out, weights                                    # [B, L, D], [B, H, L, L] or None


class Encoder(nn.Module):
    """Magnitude embedding + positional encoding, then the blocks."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embedding = MagnitudeEmbedding(config.d_model, config.mask_token)
        self.positional = PositionalEncoding(config.d_model, config.pe_base)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layers))

    def attention_bias(self, masked: Tensor) -> Tensor | None:
        """The additive logit bias from the masked rows (padding or hidden), bool [B, L]. At inference a
        batch without any masked row gets None: its bias would be all zeros."""
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not masked.any():
            return None
        m = masked.float()
        if self.config.attention_mask == "additive_one":
            # Astromer 1: M[b, i, j] = min(1, mask_i + mask_j) is *added*: masked keys get a higher logit.
            return torch.clamp(m[:, :, None] + m[:, None, :], max=1.0).unsqueeze(1)   # [B, 1, L, L]
        return (m * MASKED_LOGIT)[:, None, None, :]                                    # [B, 1, 1, L]

    def forward(self, times: Tensor, mags: Tensor, padding: Tensor, hidden: Tensor | None = None,
                all_layers: bool = False, need_weights: bool = False, fast: bool = True):
        masked = padding if hidden is None else padding | hidden                      # [B, L]
        replace = masked if self.embedding.mask_token is not None else hidden
        x = self.embedding(mags, replace, add_to=self.positional(times))               # [B, L, D]
        x = self.dropout(x)
        bias = self.attention_bias(masked)
        layers, maps = [x], []
        for block in self.blocks:
            x, weights = block(x, bias, fast=fast, need_weights=need_weights)
            layers.append(x)
            maps.append(weights)
        out = layers if all_layers else x
        return (out, maps) if need_weights else out


def init_time_attention(encoder: Encoder, scale: float = 1.0, blocks: int = 1) -> None:
    """Start the first ``blocks`` blocks' attention as a kernel in time: query and key projections =
    ``scale`` x identity (biases 0), so that a query scores each key by the dot product of their inputs,
    dominated at the start by the positional encodings: sum_j cos(w_j (t_q - t_k)) over the head's
    frequencies. Each of the 4 heads then covers one band of the encoding's frequencies (1 to 1e-4
    rad/day), i.e. neighbours within days, weeks, months and years. An initialisation only (the
    architecture and its parameters are unchanged): with the default random init a fresh model spends
    thousands of steps with near-uniform attention, predicting the window mean for hidden observations."""
    with torch.no_grad():
        for block in list(encoder.blocks)[:blocks]:
            for projection in (block.attention.wq, block.attention.wk):
                projection.weight.copy_(scale * torch.eye(projection.weight.shape[0]))
                projection.bias.zero_()


class ReconstructionHead(nn.Module):
    """LayerNorm then Dense D -> 1: the reconstructed (centred) magnitude of every observation."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model, eps=config.layernorm_eps)
        self.out = nn.Linear(config.d_model, 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.out(self.norm(h)).squeeze(-1)              # [B, L, D] -> [B, L]


def flops_per_window(config: ModelConfig, length: int | None = None, head: bool = True) -> int:
    """Multiply-add FLOPs (2 per MAC) of one forward pass over one window of ``length`` observations:
    the matrix products only (projections, attention scores and mixing, FFN, residual projections)."""
    n = config.window_length if length is None else length
    d, f = config.d_model, config.d_ff
    per_block = 2 * n * d * d * 4                     # Q, K, V and output projections
    per_block += 2 * 2 * n * n * d                    # Q K^T and weights @ V, all heads
    per_block += 2 * 2 * n * d * f                    # the two FFN layers
    if config.residual == "projection":
        per_block += 2 * 2 * n * d * d                # reshape_leak_1 and reshape_leak_2
    total = 2 * n * d + config.n_layers * per_block   # input projection + blocks
    return total + (2 * n * d if head else 0)


class Astromer(nn.Module):
    """The encoder plus its reconstruction head, with the public API of the platform.

    ``encode`` / ``reconstruct`` / ``attention_maps`` / ``embed`` validate their input and raise
    TypeError or ValueError naming the field and row; ``forward`` (the training path) does not.
    """

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ModelConfig.astromer1()
        self.encoder = Encoder(self.config)
        self.head = ReconstructionHead(self.config)
        self.bf16_on_cuda = True        # autocast to bfloat16 when the model runs on a CUDA device
        # The compiled encoder (if any) is kept outside the module tree so the state_dict stays the same.
        object.__setattr__(self, "_compiled_encoder", None)

    # ---- execution settings ----------------------------------------------------------------------
    @property
    def fast(self) -> bool:
        return self.config.attention_impl == "sdpa"

    def compile_encoder(self, **kwargs) -> Astromer:
        """Run the encoder through torch.compile from now on (optional fast path); returns self."""
        object.__setattr__(self, "_compiled_encoder", torch.compile(self.encoder, **kwargs))
        return self

    @property
    def _encoder_fn(self):
        return self._compiled_encoder if self._compiled_encoder is not None else self.encoder

    def _autocast(self, device: torch.device):
        enabled = self.bf16_on_cuda and device.type == "cuda"
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)

    def num_parameters(self, part: str = "all") -> int:
        """Parameter count: "all", "encoder" (input projection + blocks, no [MASK] token) or "head"."""
        if part == "all":
            params = self.parameters()
        elif part == "head":
            params = self.head.parameters()
        elif part == "encoder":
            params = [p for n, p in self.encoder.named_parameters() if n != "embedding.mask_token"]
        else:
            raise ValueError(f"unknown part {part!r}: expected 'all', 'encoder' or 'head'")
        return sum(p.numel() for p in params)

    # ---- training path ---------------------------------------------------------------------------
    def forward(self, times: Tensor, mags: Tensor, padding_mask: Tensor, hidden: Tensor | None = None,
                validate: bool = False) -> Tensor:
        """Reconstruction [B, L] (training path: validation off unless asked)."""
        if validate:
            times, mags, padding_mask, hidden = self._validate(times, mags, padding_mask, hidden)
        with self._autocast(times.device):
            h = self._encoder_fn(times, mags, padding_mask, hidden, fast=self.fast)
            return self.head(h).float()

    # ---- public API ------------------------------------------------------------------------------
    def encode(self, times, mags, padding_mask, all_layers: bool = False, hidden=None,
               return_attention: bool = False):
        """Embeddings [B, L, D] of the last block (all rows, padding included), or with ``all_layers`` a
        list [input embedding, block 1, ..., block n]. With ``return_attention`` also the attention
        weights [B, H, L, L] of every block (computed on the reference path)."""
        times, mags, padding_mask, hidden = self._validate(times, mags, padding_mask, hidden)
        with self._autocast(times.device):
            if return_attention:
                out, maps = self.encoder(times, mags, padding_mask, hidden, all_layers=all_layers,
                                         need_weights=True, fast=False)
            else:
                out = self._encoder_fn(times, mags, padding_mask, hidden, all_layers=all_layers,
                                       fast=self.fast)
        out = [t.float() for t in out] if all_layers else out.float()
        return (out, [m.float() for m in maps]) if return_attention else out

    def attention_maps(self, times, mags, padding_mask, hidden=None) -> list[Tensor]:
        """Softmax attention weights [B, H, L, L] (query, key) of each block."""
        return self.encode(times, mags, padding_mask, hidden=hidden, return_attention=True)[1]

    def reconstruct(self, times, mags, padding_mask, hidden=None) -> Tensor:
        """Reconstructed centred magnitudes [B, L]."""
        times, mags, padding_mask, hidden = self._validate(times, mags, padding_mask, hidden)
        return self.forward(times, mags, padding_mask, hidden)

    def embed(self, curves: Sequence, batch_size: int = 256, all_layers: bool = False,
              progress: bool = False) -> np.ndarray:
        """One vector per light curve: the mean over the real observations of all its windows of the last
        block's output, [N, D]; with ``all_layers`` the same for the input embedding and every block,
        [N, n_layers + 1, D]. ``curves`` is a sequence of (mjd, mag) or (mjd, mag, err) arrays; windows
        follow ``config.window_rule``. ``progress`` shows a tqdm bar over the batches."""
        curves = list(curves)
        windows = curves_windows(curves, length=self.config.window_length, rule=self.config.window_rule)
        return self.embed_windows(windows, len(curves), batch_size=batch_size, all_layers=all_layers,
                                  progress=progress)

    def embed_windows(self, windows: Windows, n_curves: int, batch_size: int = 256, all_layers: bool = False,
                      progress: bool = False) -> np.ndarray:
        """:meth:`embed` from windows already cut (``windows.curve`` in ``[0, n_curves)``: a curve without a
        window gets zeros), as the embedding job cuts them for a whole batch of curves at once."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected a positive integer")
        d = self.config.d_model
        n_out = self.config.n_layers + 1 if all_layers else 1
        device = next(self.parameters()).device
        # the sums stay on the model's device, so nothing waits for the GPU until the end (in float64 where
        # the device has it: Apple's MPS does not)
        total = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        sums = torch.zeros(n_curves, n_out, d, dtype=total, device=device)
        counts = torch.zeros(n_curves, dtype=total, device=device)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                starts = range(0, len(windows), batch_size)
                if progress:
                    from tqdm.auto import tqdm

                    starts = tqdm(starts, desc="embed", unit="batch")
                for lo in starts:
                    part = windows.take(slice(lo, lo + batch_size))
                    times = torch.from_numpy(part.times).to(device)
                    mags = torch.from_numpy(part.mags).to(device)
                    padding = torch.from_numpy(part.padding).to(device)
                    with self._autocast(device):
                        out = self._encoder_fn(times, mags, padding, None, all_layers=all_layers,
                                               fast=self.fast)
                    layers = out if all_layers else [out]                              # n_out x [b, L, D]
                    real = (~padding).to(torch.float32).unsqueeze(1)                    # [b, 1, L]
                    pooled = torch.stack([torch.bmm(real, h.float()).squeeze(1) for h in layers], 1)
                    curve = torch.from_numpy(part.curve).to(device)
                    sums.index_add_(0, curve, pooled.to(total))                         # [N, n_out, D]
                    counts.index_add_(0, curve, torch.from_numpy(part.n_valid).to(device, total))
        finally:
            self.train(was_training)
        emb = (sums / counts.clamp_min(1)[:, None, None]).float().cpu().numpy()
        return emb if all_layers else emb[:, 0]

    # ---- validation ------------------------------------------------------------------------------
    def _validate(self, times, mags, padding_mask, hidden):
        device = next(self.parameters()).device
        tensors = {}
        for field, value in (("times", times), ("mags", mags), ("padding_mask", padding_mask),
                             ("hidden", hidden)):
            if value is None:
                continue
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
            if not isinstance(value, Tensor):
                raise TypeError(f"{field} must be a torch.Tensor or numpy array, got {type(value).__name__}")
            if field in ("padding_mask", "hidden"):
                if value.dtype != torch.bool:
                    raise TypeError(f"{field} must be a bool tensor (True = {'padding' if field == 'padding_mask' else 'hidden'}), "
                                    f"got {value.dtype}")
            elif not value.is_floating_point():
                raise TypeError(f"{field} must be a floating-point tensor, got {value.dtype}")
            if value.ndim != 2:
                raise ValueError(f"{field} must have shape [B, L], got {tuple(value.shape)}")
            tensors[field] = value
        shape = tensors["times"].shape
        for field, value in tensors.items():
            if value.shape != shape:
                raise ValueError(f"{field} has shape {tuple(value.shape)} but times has {tuple(shape)}")
        if shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"empty batch: times has shape {tuple(shape)}")
        for field in ("times", "mags"):
            bad = ~torch.isfinite(tensors[field])
            if bad.any():
                row, col = (int(i) for i in bad.nonzero()[0])
                raise ValueError(f"{field} is not finite ({float(tensors[field][row, col])}) at row {row}, "
                                 f"position {col}")
        real = ~tensors["padding_mask"]
        empty = ~real.any(dim=1)
        if empty.any():
            raise ValueError(f"empty window: row {int(empty.nonzero()[0, 0])} of padding_mask has no real "
                             "observation")
        t = tensors["times"]
        both_real = real[:, 1:] & real[:, :-1]
        bad = both_real & (t[:, 1:] <= t[:, :-1])
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            kind = "duplicate" if t[row, col + 1] == t[row, col] else "unsorted"
            hint = precision_hint(str(t.dtype), float(t[row, col]))
            raise ValueError(f"{kind} times in row {row}: times[{col + 1}]={float(t[row, col + 1])} after "
                             f"times[{col}]={float(t[row, col])} (must be strictly increasing{hint})")
        out = [tensors["times"].to(device, torch.float32), tensors["mags"].to(device, torch.float32),
               tensors["padding_mask"].to(device)]
        out.append(tensors["hidden"].to(device) if "hidden" in tensors else None)
        return tuple(out)


class LayerWeights(nn.Module):
    """Softmax-normalised trainable weights gamma over the input embedding and every block."""

    def __init__(self, n_layers: int, init: str = "uniform"):
        super().__init__()
        if init == "uniform":                       # the official code: 1/(n+1) each
            gamma = torch.full((n_layers,), 1.0 / n_layers)
        elif init == "last":
            gamma = torch.zeros(n_layers)
            gamma[-1] = 2.0
        elif init == "random":
            gamma = torch.randn(n_layers) * 0.5
        else:
            raise ValueError(f"gamma_init must be uniform, last or random, not {init!r}")
        self.gamma = nn.Parameter(gamma)

    def forward(self, layer_means: Tensor) -> Tensor:
        # layer_means: [B, K, D] -> [B, D]; like the official code, weighted then averaged over layers
        w = torch.softmax(self.gamma, dim=0)        # [K]
        return (layer_means * w[None, :, None]).mean(dim=1)


class SkipHead(nn.Module):
    """The paper's ``skip`` classifier on per-layer means of a frozen encoder [B, K, D] (K = blocks + 1):
    softmax(gamma)-weighted average over the layers, Dense 1024-512-256 with ReLU, LayerNorm, Dense to the
    classes (logits). ``set_standardization`` z-scores every (layer, dimension) first (not in the official
    code; see ``evaluate.ClassifierConfig.standardize``); without it the head is the official one."""

    def __init__(self, n_layers: int, d_model: int, n_classes: int, hidden: Sequence[int] = (1024, 512, 256),
                 dropout: float = 0.0, gamma_init: str = "uniform"):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes={n_classes}: expected at least 2")
        self.layer_weights = LayerWeights(n_layers, gamma_init)
        blocks: list[nn.Module] = []
        width = d_model
        for h in hidden:
            blocks += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                blocks.append(nn.Dropout(dropout))
            width = h
        self.mlp = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(width, eps=1e-3)   # Keras LayerNormalization default epsilon (the official head)
        self.out = nn.Linear(width, n_classes)
        # input standardisation: the identity unless set from training data
        self.register_buffer("shift", torch.zeros(n_layers, d_model))
        self.register_buffer("scale", torch.ones(n_layers, d_model))

    def set_standardization(self, layer_means: Tensor) -> None:
        self.shift.copy_(layer_means.mean(0))
        self.scale.copy_(layer_means.std(0).clamp_min(1e-6) if len(layer_means) > 1 else torch.ones_like(self.scale))

    def pooled(self, layer_means: Tensor) -> Tensor:
        return self.layer_weights((layer_means - self.shift) / self.scale)  # [B, K, D] -> [B, D]

    def forward(self, layer_means: Tensor) -> Tensor:
        return self.out(self.norm(self.mlp(self.pooled(layer_means))))   # [B, n_classes]

    def gammas(self) -> np.ndarray:
        return torch.softmax(self.layer_weights.gamma.detach(), 0).cpu().numpy()


class SkipClassifier(nn.Module):
    """The paper's `skip` classifier end to end: a frozen Astromer whose input embedding and block outputs
    are averaged over real observations (``pool``), then :class:`SkipHead`."""

    def __init__(self, encoder: Astromer, n_classes: int, hidden: Sequence[int] = (1024, 512, 256),
                 dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.head = SkipHead(encoder.config.n_layers + 1, encoder.config.d_model, n_classes, hidden, dropout)

    def train(self, mode: bool = True) -> SkipClassifier:
        super().train(mode)
        self.encoder.eval()          # frozen: no dropout in the encoder
        return self

    def pool(self, times: Tensor, mags: Tensor, padding_mask: Tensor) -> Tensor:
        """Per-layer means over real observations, [B, n_layers + 1, D] (what downstream can cache)."""
        with torch.no_grad():
            layers = self.encoder.encode(times, mags, padding_mask, all_layers=True)
        h = torch.stack(layers, 1)                                     # [B, n+1, L, D]
        real = (~padding_mask.to(h.device)).to(h.dtype)[:, None, :, None]
        return (h * real).sum(2) / real.sum(2).clamp_min(1)            # [B, n+1, D]

    def forward(self, times: Tensor, mags: Tensor, padding_mask: Tensor) -> Tensor:
        return self.head(self.pool(times, mags, padding_mask))        # [B, n_classes]
