"""Hybrid Tuning's adapter (Qu et al., jinggqu/NextGen-UIA @ 69dd54f, ``src/adapters/mona.py``).

The "hybrid" MONA variant (``HybridNoiseFreqMona``): a bottleneck adapter on a block's tokens,

    y = x + W2 . drop(gelu(Op(W1 . (LN(x) * gamma + x * gammax))))

where ``Op`` works on the (B, C, H, W) bottleneck grid of the patch tokens:

1. **Frequency Filtering**: ``irfft2(rfft2(x) * filter)``. The original's filter is one learnable
   value per channel (``filter_mode="channel"``, shape (C,)), which is the same at every frequency,
   so it equals a per-channel rescaling of the grid (it cannot single out a frequency). The paper's
   description (a filter in the 2-D Fourier domain that suppresses periodic artefacts) is
   ``filter_mode="spectral"``: one learnable value per channel *and* rFFT2 frequency, shape
   (C, H, W//2 + 1), initialised to ones (identity) like the original.
2. Depth-wise 3x3 / 5x5 / 7x7 convolutions of the filtered grid.
3. **Noise Estimation**: global average pool -> 1x1 conv C -> C/4 -> ReLU -> 1x1 conv C/4 -> 3 ->
   softmax over the 3 scales: (B, 3, 1, 1) weights (non-negative, summing to 1 per image) that mix
   the three convolutions; then + identity, and a residual 1x1 projector.

The original also carries the CLS token through W1 / W2 without ``Op``; the cached features here
hold patch tokens only, so the adapter sees the (B, N, D) patch tokens (N = H * W).
Parameter names follow the original's so its state dicts load (benchmarks/parity/hybrid_tuning.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FILTER_MODES = ("channel", "spectral")


class FrequencyFilter(nn.Module):
    """Learnable multiplicative filter in rFFT2 space over the last two dims of (B, C, H, W)."""

    def __init__(self, channels: int, grid: tuple[int, int], mode: str = "channel"):
        super().__init__()
        if mode not in FILTER_MODES:
            raise ValueError(f"filter mode {mode!r} is not one of {FILTER_MODES}")
        h, w = grid
        shape = (channels,) if mode == "channel" else (channels, h, w // 2 + 1)
        self.weight = nn.Parameter(torch.ones(shape))  # ones: the identity at start (original)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        weight = self.weight.view(1, -1, 1, 1) if self.weight.dim() == 1 else self.weight.unsqueeze(0)
        spectrum = torch.fft.rfft2(x.float(), dim=(-2, -1))  # (B, C, H, W//2+1) complex
        return torch.fft.irfft2(spectrum * weight, s=(h, w), dim=(-2, -1)).to(x.dtype)


class NoiseEstimator(nn.Sequential):
    """(B, C, H, W) -> (B, 3, 1, 1) softmax weights of the three convolution scales."""

    def __init__(self, channels: int):
        hidden = max(channels // 4, 1)
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 3, 1),
            nn.Softmax(dim=1),
        )


class HybridConvOp(nn.Module):
    """``HybridNoiseFreqMonaOp``: filter, multi-scale depth-wise convs mixed by the noise weights, projector."""

    def __init__(self, channels: int, grid: tuple[int, int], filter_mode: str = "channel"):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=5, padding=2, groups=channels)
        self.conv3 = nn.Conv2d(channels, channels, kernel_size=7, padding=3, groups=channels)
        self.projector = nn.Conv2d(channels, channels, kernel_size=1)
        self.frequency = FrequencyFilter(channels, grid, filter_mode)
        self.noise_estimator = NoiseEstimator(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> same
        identity = x
        x = self.frequency(x)
        weights = self.noise_estimator(x)  # (B, 3, 1, 1), estimated from the filtered grid (original)
        mixed = self.conv1(x) * weights[:, 0:1] + self.conv2(x) * weights[:, 1:2] + self.conv3(x) * weights[:, 2:3]
        x = mixed + identity
        return x + self.projector(x)


class HybridAdapter(nn.Module):
    """``HybridNoiseFreqMona`` on batch-first patch tokens: (B, N, D) -> (B, N, D), N = H * W."""

    def __init__(self, dim: int, grid: tuple[int, int], bottleneck: int = 64, filter_mode: str = "channel"):
        super().__init__()
        self.grid = tuple(grid)
        self.project1 = nn.Linear(dim, bottleneck)
        self.project2 = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(p=0.1)
        self.adapter_conv = HybridConvOp(bottleneck, self.grid, filter_mode)
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.ones(dim) * 1e-6)  # LN branch starts almost off (original)
        self.gammax = nn.Parameter(torch.ones(dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        h, w = self.grid
        x = self.project1(self.norm(tokens) * self.gamma + tokens * self.gammax)  # (B, N, C)
        grid = x.transpose(1, 2).reshape(b, -1, h, w)  # (B, C, H, W); tokens are row-major
        x = self.adapter_conv(grid).flatten(2).transpose(1, 2)  # (B, N, C)
        return tokens + self.project2(self.dropout(F.gelu(x)))


class HybridPatchAdapter(nn.Module):
    """UltraAD's ``adapter: hybrid``: the hybrid adapter, then the linear map into the joint space."""

    def __init__(self, width: int, dim: int, grid: tuple[int, int], bottleneck: int = 64, filter_mode: str = "channel"):
        super().__init__()
        self.hybrid = HybridAdapter(width, grid, bottleneck, filter_mode)
        self.project = nn.Linear(width, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, N, W) -> (B, N, D)
        return self.project(self.hybrid(tokens))
