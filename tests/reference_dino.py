"""An independent, plain-PyTorch DINO network with the official checkpoint key layout.

Written for the tests from the paper and the documented layout (fused `qkv`, `blocks.N.*`, `pos_embed`,
`head.mlp.{0,2,4}`, weight-normalised `head.last_layer`), sharing no code with hf_dino, so that conversion
parity is checked against a second implementation rather than against itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ReferenceAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attention = ((q @ k.transpose(-2, -1)) * (dim // self.heads) ** -0.5).softmax(dim=-1)
        out = (attention @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out), attention


class ReferenceMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ReferenceBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ReferenceAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ReferenceMlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, attention = self.attn(self.norm1(x))
        x = x + y
        return x + self.mlp(self.norm2(x)), attention


class ReferencePatchEmbed(nn.Module):
    def __init__(self, patch: int, channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)


class ReferenceViT(nn.Module):
    def __init__(
        self,
        *,
        patch: int = 16,
        dim: int = 128,
        depth: int = 2,
        heads: int = 2,
        img: int = 224,
        channels: int = 3,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.patch = patch
        self.patch_embed = ReferencePatchEmbed(patch, channels, dim)
        grid = img // patch
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, dim) * 0.02)
        self.blocks = nn.ModuleList([ReferenceBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def positions(self, rows: int, cols: int, square: bool) -> torch.Tensor:
        n = self.pos_embed.shape[1] - 1
        if rows * cols == n and square:
            return self.pos_embed
        side = math.sqrt(n)
        grid = self.pos_embed[:, 1:].reshape(1, int(side), int(side), -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic")
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([self.pos_embed[:, :1], grid], dim=1)

    def forward_all(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = images.shape[2] // self.patch, images.shape[3] // self.patch
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.positions(
            rows, cols, images.shape[2] == images.shape[3]
        )
        attention = None
        for block in self.blocks:
            x, attention = block(x)
        return self.norm(x), attention

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_all(images)[0][:, 0]


class ReferenceHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden: int = 64, bottleneck: int = 32) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
