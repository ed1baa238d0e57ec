"""The models: a Vision Transformer written here, torchvision's ResNet-18 and seed 001's small CNN
(`vitexp.resnet_attn` adds ResNet-18 with an attention block).

Each model option is a schema and a builder registered together in `MODELS`; a new model is one more
`@MODELS.register(name, Schema)` function (and its `conf/model/<name>.yaml`).

Fine-tuning (`model.freeze=backbone`, `optim.backbone_lr_scale`) needs to know which parameters are the
classification head. Only the model knows that, so each model says it itself: a `HeadFinetuning` model
names its head's child modules in `head_modules`, and the optimizers ask `is_head` rather than guessing
from parameter names. For the same reason each model says what its representation is: `embed(images)` is
what its classifier reads (the code layer's output where there is one), so a probe fitted on embeddings
reads the same vector for every model, and `classify(embed(images))` is `forward(images)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet, ResNet18_Weights
from torchvision.models.resnet import BasicBlock
from torchvision.ops import StochasticDepth

from vitexp.config import Config, ConfigError, ModelConfig, Rule
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
    drop_path: float = 0.0  # stochastic depth: the last block's branch drop rate (linear from 0 at the first)
    code_size: int | None = None  # width of a linear code (embedding) layer before the classifier; None: none

    def rules(self) -> Iterator[Rule]:
        yield from super().rules()
        yield "patch_size", self.patch_size >= 1, "an integer >= 1 that divides data.img_size"
        yield "dim", self.dim >= 1, "an integer >= 1 divisible by model.heads"
        yield "depth", self.depth >= 1, "an integer >= 1"
        yield "heads", self.heads >= 1 and self.dim % self.heads == 0, f"an integer >= 1 dividing model.dim={self.dim}"
        yield "mlp_ratio", self.mlp_ratio > 0, "a float > 0"
        yield "dropout", 0 <= self.dropout < 1, "a float in [0, 1)"
        yield "drop_path", 0 <= self.drop_path < 1, "a float in [0, 1)"
        yield "code_size", self.code_size is None or self.code_size >= 1, "an integer >= 1, or null (no code layer)"

    def rules_in(self, config: Config) -> Iterator[Rule]:
        size = config.data.img_size
        yield "data.img_size", size >= self.patch_size, f"at least model.patch_size={self.patch_size} (one patch)"
        yield "model.patch_size", size % self.patch_size == 0, f"a divisor of data.img_size={size}"


@dataclass
class ResNetConfig(ModelConfig):
    name: str = "resnet18"
    pretrained: bool = False  # torchvision's ImageNet weights (downloaded once into TORCH_HOME)
    code_size: int | None = None  # width of a linear code (embedding) layer before the classifier; None: none

    def rules(self) -> Iterator[Rule]:
        yield from super().rules()
        yield "code_size", self.code_size is None or self.code_size >= 1, "an integer >= 1, or null (no code layer)"


class HeadFinetuning(nn.Module):
    """A model whose classification head can be trained alone (`model.freeze=backbone`) or at another
    learning rate than the rest (`optim.backbone_lr_scale`).

    `head_modules` names the direct children that make up the head. A frozen backbone stays in eval mode
    whatever `train()` says: BatchNorm keeps its statistics (they are part of the pretrained model, and a
    frozen model must not change) and dropout and stochastic depth stay off, so the head learns from the
    features it will be evaluated on.
    """

    head_modules: tuple[str, ...] = ()
    backbone_frozen: bool = False

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, width): the representation the classifier reads; the code layer's output if there is one."""
        raise NotImplementedError(f"{type(self).__name__} does not define embed()")

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """The logits of `embed`'s output: `classify(embed(images))` computes `forward(images)`."""
        raise NotImplementedError(f"{type(self).__name__} does not define classify()")

    def train(self, mode: bool = True) -> HeadFinetuning:
        super().train(mode)
        if self.backbone_frozen:
            for name, child in self.named_children():
                if name not in self.head_modules:
                    child.train(False)
        return self


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

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, heads, tokens, tokens): each head's attention softmax(q k^T / sqrt(d_head)), rows summing to 1."""
        batch, tokens, dim = x.shape
        q, k, _ = self.qkv(x).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        return torch.softmax(q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5, dim=-1)


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm(x)), then x + mlp(norm(x)).

    With `drop_path` > 0 each residual branch is dropped per sample with that probability in training and
    scaled by 1 / (1 - drop_path) when kept (stochastic depth, as timm's `DropPath`); the draws come from
    torch's global generator, like dropout's, so a resumed run draws the same. At 0 the branch is an
    `nn.Identity`, which draws nothing: such a model computes exactly what it did before the option existed.
    `attn` replaces the multi-head attention by another module mapping (batch, tokens, dim) to the same shape.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
        eps: float,
        drop_path: float = 0.0,
        attn: nn.Module | None = None,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, dropout) if attn is None else attn
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(HeadFinetuning):
    """ViT (Dosovitskiy et al. 2021): conv patch embedding, cls token, learned positions, pre-norm blocks.

    Its parameters are torchvision's `VisionTransformer`'s, one for one. With `code_size` a linear code
    (embedding) layer of that width sits between the final norm and the classifier, with no activation
    between: torchvision's ViT built with `num_classes=code_size`, then `nn.Linear(code_size, classes)`. The
    code layer is initialised as every other linear layer and the classifier at zero, as without it.
    """

    no_weight_decay = ("cls_token", "pos_embed")
    head_modules = ("code", "head")

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
        drop_path: float = 0.0,
        code_size: int | None = None,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        num_patches = (img_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.pos_drop = nn.Dropout(dropout)
        # Deeper blocks are dropped more, as timm (on the CPU: a rate is a number, whatever the default device).
        rates = [x.item() for x in torch.linspace(0, drop_path, depth, device="cpu")]
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, dropout, eps, rate) for rate in rates])
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.code = nn.Linear(dim, code_size) if code_size is not None else None
        self.head = nn.Linear(code_size or dim, num_classes)
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

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The normed cls token, through the code layer if there is one."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(self.pos_drop(x + self.pos_embed))
        x = self.norm(x[:, 0])
        if self.code is not None:
            x = self.code(x)
        return x

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.head(embedding)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(images))


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be loaded; the message says where to put the cached file."""


@MODELS.register("vit", ViTConfig)
def build_vit(cfg: ViTConfig, num_classes: int, img_size: int) -> nn.Module:
    return VisionTransformer(
        img_size,
        cfg.patch_size,
        num_classes,
        cfg.dim,
        cfg.depth,
        cfg.heads,
        cfg.mlp_ratio,
        cfg.dropout,
        drop_path=cfg.drop_path,
        code_size=cfg.code_size,
    )


class ResNet18(HeadFinetuning, ResNet):
    """torchvision's ResNet-18 (built as `torchvision.models.resnet18` builds it, the same weights for a
    seed), whose head is `fc`: one linear layer, or with a code layer `Sequential(code, classifier)`."""

    head_modules = ("fc",)

    def __init__(self, num_classes: int) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, 512): the pooled output of the convolutional trunk, as torchvision's forward computes it."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled 512 features, through the code layer (`fc[0]`) if there is one."""
        x = self.features(images)
        return self.fc[0](x) if isinstance(self.fc, nn.Sequential) else x

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.fc[1](embedding) if isinstance(self.fc, nn.Sequential) else self.fc(embedding)


def load_imagenet_resnet18(model: nn.Module) -> None:
    """torchvision's ImageNet weights into `model`, a ResNet-18 with 1000 outputs (downloaded once into
    TORCH_HOME); a `PretrainedWeightsError` saying where to put the file when they cannot be had."""
    weights = ResNet18_Weights.IMAGENET1K_V1
    try:
        model.load_state_dict(weights.get_state_dict(progress=False, check_hash=True))
    except (OSError, RuntimeError) as err:  # URLError is an OSError; no network ends here
        cache = torch.hub.get_dir() + "/checkpoints/" + weights.url.rsplit("/", 1)[-1]
        raise PretrainedWeightsError(
            f"could not load ResNet-18 ImageNet weights ({err}). Without network, download {weights.url} "
            f"elsewhere and place it at {cache} (or set TORCH_HOME to a directory holding hub/checkpoints/)"
        ) from err


@MODELS.register("resnet18", ResNetConfig)
def build_resnet18(cfg: ResNetConfig, num_classes: int, img_size: int) -> nn.Module:
    model = ResNet18(num_classes=1000 if cfg.pretrained else num_classes)
    if cfg.pretrained:
        load_imagenet_resnet18(model)
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    if cfg.code_size is not None:  # the code layer then the classifier, both the head (`fc`)
        model.fc = nn.Sequential(nn.Linear(model.fc.in_features, cfg.code_size), nn.Linear(cfg.code_size, num_classes))
    return model


@dataclass
class CNNConfig(ModelConfig):
    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [32, 32, 32])  # output channels of each convolution
    kernel_size: int = 3  # side of every convolution's kernel (stride 1, no padding)
    code_size: int | None = 128  # width of the linear code (embedding) layer before the classifier; None: none

    def rules(self) -> Iterator[Rule]:
        yield from super().rules()
        yield "channels", len(self.channels) >= 1 and min(self.channels) >= 1, "a non-empty list of integers >= 1"
        yield "kernel_size", self.kernel_size >= 1, "an integer >= 1"
        yield "code_size", self.code_size is None or self.code_size >= 1, "an integer >= 1, or null (no code layer)"

    def rules_in(self, config: Config) -> Iterator[Rule]:
        crop = self.kernel_size - 1
        shrink = len(self.channels) * crop
        allowed = f"more than {shrink} pixels (each unpadded convolution takes model.kernel_size-1={crop} off)"
        yield "data.img_size", config.data.img_size > shrink, allowed


class ConvEncoder(HeadFinetuning):
    """Seed 001's CNN baseline: unpadded stride-1 convolutions each followed by ReLU, flattened, a linear code
    (embedding) layer, then the classifier (no activation between the two, as the seed's ViT).

    Its flattened width grows with the image: at 28 px the seed's model has 2,002,698 parameters (one input
    channel; RGB adds 576), at 224 px the code layer alone has 195M. It is a baseline for small images. PyTorch's
    default initialisation throughout, as the seed's.
    """

    head_modules = ("code", "head")

    def __init__(
        self,
        img_size: int,
        num_classes: int,
        channels: list[int],
        kernel_size: int = 3,
        code_size: int | None = 128,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        side = img_size - len(channels) * (kernel_size - 1)
        if side < 1:
            raise ValueError(f"img_size {img_size} is too small for {len(channels)} convolutions of {kernel_size}")
        layers: list[nn.Module] = []
        for width_in, width in zip([in_channels, *channels[:-1]], channels, strict=True):
            layers += [nn.Conv2d(width_in, width, kernel_size), nn.ReLU()]
        self.convs = nn.Sequential(*layers, nn.Flatten())
        flat = channels[-1] * side * side
        self.code = nn.Linear(flat, code_size) if code_size is not None else None
        self.head = nn.Linear(code_size or flat, num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The code layer's output, or without one the flattened feature maps."""
        x = self.convs(images)
        return self.code(x) if self.code is not None else x

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.head(embedding)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(images))


@MODELS.register("cnn", CNNConfig)
def build_cnn(cfg: CNNConfig, num_classes: int, img_size: int) -> nn.Module:
    return ConvEncoder(img_size, num_classes, list(cfg.channels), cfg.kernel_size, cfg.code_size)


def build_model(cfg: ModelConfig, num_classes: int, img_size: int) -> nn.Module:
    """The registered model `cfg.name`, with `num_classes` outputs for `img_size` square images (with
    `cfg.freeze=backbone`, only its head trainable)."""
    model = MODELS.build(cfg, num_classes, img_size)
    if cfg.freeze == "backbone":
        freeze_backbone(model)
    return model


def head_modules(model: nn.Module) -> tuple[str, ...]:
    """The names of the children that are `model`'s classification head; an error for a model that has none."""
    heads = model.head_modules if isinstance(model, HeadFinetuning) else ()
    if not heads:
        raise ConfigError(
            f"{type(model).__name__} does not say which of its modules are its classification head, so "
            "model.freeze=backbone and optim.backbone_lr_scale cannot be used with it: expected a model "
            "that subclasses vitexp.models.HeadFinetuning and sets head_modules"
        )
    return heads


def embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """`model.embed(images)`: the representation its classifier reads; an error naming the model if it has none."""
    if not isinstance(model, HeadFinetuning) or type(model).embed is HeadFinetuning.embed:
        raise ConfigError(
            f"{type(model).__name__} does not say which of its outputs is its embedding: expected a model that "
            "subclasses vitexp.models.HeadFinetuning and defines embed() and classify()"
        )
    return model.embed(images)


def is_head(model: nn.Module, name: str) -> bool:
    """Whether the parameter (or buffer) `name` of `model` belongs to its classification head."""
    return name.split(".", 1)[0] in head_modules(model)


def freeze_backbone(model: nn.Module) -> None:
    """Train only the head: every other parameter stops requiring gradients (so no optimizer holds it) and
    the backbone stays in eval mode (see `HeadFinetuning`)."""
    for name, param in model.named_parameters():
        param.requires_grad_(is_head(model, name))
    model.backbone_frozen = True
    model.train(model.training)


def count_parameters(model: nn.Module, trainable: bool = False) -> int:
    """Parameters of `model`; with `trainable`, only those that require gradients (the head, when frozen)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def param_groups(model: nn.Module, weight_decay: float, backbone_lr: float | None = None) -> list[dict]:
    """Two optimizer groups: decay on weight matrices/kernels, none on norms, biases, cls token, positions.

    With `backbone_lr`, four: the head's two (at the optimizer's learning rate; first, so that the rate a
    run logs, the first group's, is the head's) and the backbone's two at `backbone_lr`. Parameters that
    do not require gradients (a frozen backbone) are in none.
    """
    skip = set(getattr(model, "no_weight_decay", ()))
    decay, no_decay = [], []
    backbone_decay, backbone_no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_wd = param.ndim <= 1 or name in skip
        if backbone_lr is None or is_head(model, name):
            (no_decay if no_wd else decay).append(param)
        else:
            (backbone_no_decay if no_wd else backbone_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if backbone_lr is not None:
        groups += [
            {"params": backbone_decay, "weight_decay": weight_decay, "lr": backbone_lr},
            {"params": backbone_no_decay, "weight_decay": 0.0, "lr": backbone_lr},
        ]
    return groups
