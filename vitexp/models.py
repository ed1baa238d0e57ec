"""The models: a Vision Transformer written here, and torchvision's ResNet-18.

Each model option is a schema and a builder registered together in `MODELS`; a new model is one more
`@MODELS.register(name, Schema)` function (and its `conf/model/<name>.yaml`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet18_Weights, resnet18

from vitexp.config import Config, ModelConfig, Rule
from vitexp.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")


@dataclass
class ViTConfig(ModelConfig):
    name: str = "vit"
    patch_size: int = 16  # pixels per side of a patch token; must divide data.img_size
    dim: int = 256  # token width; a multiple of heads
    depth: int = 6  # transformer blocks
    heads: int = 8  # attention heads per block
    mlp_ratio: float = 2.0  # MLP hidden width / dim
    dropout: float = 0.0  # in attention and MLP

    def rules(self) -> Iterator[Rule]:
        yield "patch_size", self.patch_size >= 1, "an integer >= 1 that divides data.img_size"
        yield "dim", self.dim >= 1, "an integer >= 1 divisible by model.heads"
        yield "depth", self.depth >= 1, "an integer >= 1"
        yield "heads", self.heads >= 1 and self.dim % self.heads == 0, f"an integer >= 1 dividing model.dim={self.dim}"
        yield "mlp_ratio", self.mlp_ratio > 0, "a float > 0"
        yield "dropout", 0 <= self.dropout < 1, "a float in [0, 1)"

    def rules_in(self, config: Config) -> Iterator[Rule]:
        size = config.data.img_size
        yield "data.img_size", size >= self.patch_size, f"at least model.patch_size={self.patch_size} (one patch)"
        yield "model.patch_size", size % self.patch_size == 0, f"a divisor of data.img_size={size}"


@dataclass
class ResNetConfig(ModelConfig):
    name: str = "resnet18"
    pretrained: bool = False  # torchvision's ImageNet weights (downloaded once into TORCH_HOME)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch's fused SDPA kernel."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, dim)))


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, eps: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021): conv patch embedding, cls token, learned positions, pre-norm blocks."""

    no_weight_decay = ("cls_token", "pos_embed")

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        dropout: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, dropout, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        fan_in = self.patch_embed.in_channels * self.patch_embed.kernel_size[0] * self.patch_embed.kernel_size[1]
        nn.init.trunc_normal_(self.patch_embed.weight, std=(1 / fan_in) ** 0.5)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.zeros_(self.head.weight)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(self.pos_drop(x + self.pos_embed))
        return self.head(self.norm(x[:, 0]))


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be loaded; the message says where to put the cached file."""


@MODELS.register("vit", ViTConfig)
def build_vit(cfg: ViTConfig, num_classes: int, img_size: int) -> nn.Module:
    return VisionTransformer(
        img_size, cfg.patch_size, num_classes, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.dropout
    )


@MODELS.register("resnet18", ResNetConfig)
def build_resnet18(cfg: ResNetConfig, num_classes: int, img_size: int) -> nn.Module:
    model = resnet18(num_classes=1000 if cfg.pretrained else num_classes)
    if cfg.pretrained:
        weights = ResNet18_Weights.IMAGENET1K_V1
        try:
            model.load_state_dict(weights.get_state_dict(progress=False, check_hash=True))
        except (OSError, RuntimeError) as err:  # URLError is an OSError; no network ends here
            cache = torch.hub.get_dir() + "/checkpoints/" + weights.url.rsplit("/", 1)[-1]
            raise PretrainedWeightsError(
                f"could not load ResNet-18 ImageNet weights ({err}). Without network, download {weights.url} "
                f"elsewhere and place it at {cache} (or set TORCH_HOME to a directory holding hub/checkpoints/)"
            ) from err
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def build_model(cfg: ModelConfig, num_classes: int, img_size: int) -> nn.Module:
    """The registered model `cfg.name`, with `num_classes` outputs for `img_size` square images."""
    return MODELS.build(cfg, num_classes, img_size)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: decay on weight matrices/kernels, none on norms, biases, cls token, positions."""
    skip = set(getattr(model, "no_weight_decay", ()))
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
