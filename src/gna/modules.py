"""``nn.Module`` wrappers, NATTEN-style: qkv projection, GNA, output projection."""

from __future__ import annotations

import torch
from torch import nn

from .api import neighborhood_attention
from .args import per_dim

__all__ = ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]


class _NeighborhoodAttention(nn.Module):
    ndim: int

    def __init__(self, embed_dim: int, num_heads: int, kernel_size, stride=1, dilation=1,
                 is_causal=False, qkv_bias: bool = True, qk_scale: float | None = None,
                 proj_drop: float = 0.0, **options):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim must be divisible by num_heads, got {embed_dim=}, "
                             f"{num_heads=}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kernel_size = per_dim("kernel_size", kernel_size, self.ndim)
        self.stride = per_dim("stride", stride, self.ndim)
        self.dilation = per_dim("dilation", dilation, self.ndim)
        self.is_causal = per_dim("is_causal", is_causal, self.ndim, kind=bool)
        self.scale = qk_scale
        self.options = options
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [batch, *spatial, embed_dim]`` -> same shape."""
        if x.dim() != self.ndim + 2:
            raise ValueError(f"{type(self).__name__} expects x of rank {self.ndim + 2} "
                             f"[batch, *spatial({self.ndim}), embed_dim], got {tuple(x.shape)}")
        qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=-3)
        out = neighborhood_attention(q, k, v, self.kernel_size, self.stride, self.dilation,
                                     self.is_causal, scale=self.scale, **self.options,
                                     _ndim=self.ndim)
        return self.proj_drop(self.proj(out.reshape(*x.shape[:-1], self.embed_dim)))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, is_causal={self.is_causal}")


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """GNA over ``[batch, length, embed_dim]``."""
    ndim = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """GNA over ``[batch, height, width, embed_dim]``."""
    ndim = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """GNA over ``[batch, depth, height, width, embed_dim]``."""
    ndim = 3
