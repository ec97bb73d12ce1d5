"""The Vision Transformer (Dosovitskiy et al., 2021), sized for 32x32 CIFAR-10 images.

Reads top-down like the paper: PatchEmbed -> [Block = Attention + MLP] x depth -> ViT.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ViTConfig:
    image_size: int = 32  # CIFAR-10 images are 32x32
    patch_size: int = 4  # 4 -> 64 tokens; 2 -> 256 tokens, ~5x the FLOPs
    embed_dim: int = 128  # token width; small, because 45k images cannot feed a big model
    depth: int = 6  # number of transformer blocks
    num_heads: int = 4  # attention heads; embed_dim must divide evenly among them
    mlp_ratio: float = 4.0  # MLP hidden width / embed_dim, as in the paper
    dropout: float = 0.0  # on the MLP, projections and embeddings; CIFAR ViTs rely on augmentation instead
    attn_dropout: float = 0.0  # on the attention weights
    drop_path: float = 0.0  # stochastic depth of the last block (linearly less for earlier ones); off: docs/recipe.md
    num_classes: int = 10  # CIFAR-10
    in_channels: int = 3  # RGB
    pool: str = "cls"  # "cls": classify the class token; "mean": average all patch tokens

    def __post_init__(self):
        for name in ("image_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes", "in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        for name in ("dropout", "attn_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each to embed_dim (a strided conv)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), N = (H/p) * (W/p)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.attn_dropout = cfg.attn_dropout
        self.proj_drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)  # (B, N, 3, H, D/H)
        # Split on the qkv axis, then move heads forward: the backward then stacks the three grads
        # straight into qkv's layout, one copy fewer than permute(2, 0, 3, 1, 4).unbind(0).
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # 3 x (B, H, N, D/H)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D): heads concatenated again
        return self.proj_drop(self.proj(x))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


def drop_path(branch: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Stochastic depth: a residual branch times each sample's keep scale, 0 (dropped) or 1 / (1 - p).
    keep: (B,) from ViT.drop_path_keep, or None (evaluation, or no drop-path): the branch unchanged."""
    return branch if keep is None else branch * keep.to(branch.dtype).view(-1, 1, 1)


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim)
        self.mlp = MLP(cfg)

    def forward(self, x, keep=None):  # keep: (2, B), the attention's and the MLP's keep scales, or None
        x = x + drop_path(self.attn(self.norm1(x)), None if keep is None else keep[0])
        x = x + drop_path(self.mlp(self.norm2(x)), None if keep is None else keep[1])
        return x


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.pool == "cls" else None
        num_tokens = cfg.num_patches + (cfg.pool == "cls")
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, cfg.embed_dim))
        self.drop = nn.Dropout(cfg.dropout)
        # Deeper blocks are dropped more often: early features are shared by everything after them.
        # Not persistent: the state_dict stays timm's VisionTransformer's.
        self.register_buffer("drop_rates", torch.linspace(0, cfg.drop_path, cfg.depth).view(-1, 1, 1),
                             persistent=False)  # (depth, 1, 1)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)
        self.init_weights()

    def init_weights(self, generator: torch.Generator | None = None):
        """One init for every weight matrix (as in ViT): normal, std 0.02, truncated at 2 std; zero biases.
        generator (CPU, for CPU parameters): a run's own, so that no other run's draws move its init."""
        normal = lambda t: nn.init.trunc_normal_(t, std=0.02, a=-0.04, b=0.04, generator=generator)  # noqa: E731
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                normal(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        normal(self.pos_embed)
        if self.cls_token is not None:
            normal(self.cls_token)

    def drop_path_keep(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """Every residual branch's keep scale for a training batch, in one draw: (depth, 2, B), each 0 with
        its block's rate and 1 / (1 - rate) otherwise; None in evaluation or with drop-path off.

        Drawn from `generator` (on the model's device; None: torch's global RNG) outside forward, so that a
        compiled forward holds no random op of its own: torch.compile cannot trace a generator argument,
        and would break the graph at every branch (8 graphs for the seed's shape)."""
        if not self.training or self.cfg.drop_path == 0:
            return None
        rates = self.drop_rates
        u = torch.rand(len(self.blocks), 2, batch, device=rates.device, generator=generator)
        return (u >= rates).to(rates.dtype) / (1.0 - rates)

    def forward(self, x, keep=None):
        """x: (B, C, H, W) images; keep: drop_path_keep's scales, or None (drawn here from the global RNG
        in training mode)."""
        if keep is None:
            keep = self.drop_path_keep(x.shape[0])
        x = self.patch_embed(x)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = self.drop(x + self.pos_embed)
        for i, block in enumerate(self.blocks):
            x = block(x, None if keep is None else keep[i])
        x = self.norm(x)
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)  # (B, D)
        return self.head(x)  # (B, num_classes)

