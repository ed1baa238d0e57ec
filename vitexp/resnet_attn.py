"""ResNet-18 with an attention block on its feature map (seed 002): `model=resnet18_attn`.

Seed 002 adds self-attention to a (pretrained) ResNet-18 instead of training a transformer from scratch: the
trunk's last feature map is cut into patches, each patch becomes a node's feature vector, and one ViT-structured
block (pre-norm, residual, MLP) attends over the nodes before the classifier. Its attention is either the
classic scaled dot product or the seed's graph attention (GAT-style: a score per pair of nodes from their
concatenated projections). Seed 002's best results train only the new part on a pretrained trunk, so everything
after the trunk is the head that `model.freeze=backbone` trains.

Kept in a module of its own so the models module stays about the ViT and the plain ResNet; it reuses their
ImageNet loading and the ViT's block.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from vitexp.config import Config, Rule
from vitexp.models import MODELS, Block, HeadFinetuning, ModelConfig, ResNet18, load_imagenet_resnet18

ATTENTIONS = ("classic", "graph")
# The graph attention's σ. GAT's LeakyReLU has slope 0.2 (torch's default, 0.01, is nearly a ReLU).
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")  # ResNet-18 before its pooling
TRUNK_WIDTH = 512  # channels of ResNet-18's last feature map
TRUNK_STRIDE = 32  # its downsampling: each of five stride-2 stages rounds up


def trunk_side(img_size: int) -> int:
    """Side of the trunk's feature map for `img_size` square images (7 for 224)."""
    return math.ceil(img_size / TRUNK_STRIDE)


@dataclass
class ResNetAttnConfig(ModelConfig):
    name: str = "resnet18_attn"
    pretrained: bool = False  # torchvision's ImageNet weights for the ResNet-18 trunk (as model=resnet18)
    attention: str = "classic"  # classic (softmax(QK^T/sqrt(d)) per head) or graph (seed 002's GAT-style)
    activation: str = "leaky_relu"  # graph attention's σ on the pair scores: leaky_relu (0.2), relu, elu, gelu, ...
    patch_size: int = 1  # feature-map cells per side of a node (Conv2d kernel = stride); must divide the map's side
    dim: int = 256  # node feature width in the attention block
    heads: int = 8  # classic attention heads, a divisor of dim (graph attention has one, as seed 002's)
    mlp_ratio: float = 2.0  # the block's MLP hidden width / dim
    code_size: int | None = None  # width of a linear code (embedding) layer before the classifier; None: none

    def rules(self) -> Iterator[Rule]:
        yield from super().rules()
        yield "attention", self.attention in ATTENTIONS, f"one of {', '.join(ATTENTIONS)}"
        yield "activation", self.activation in ACTIVATIONS, f"one of {', '.join(ACTIVATIONS)}"
        yield "patch_size", self.patch_size >= 1, "an integer >= 1 that divides the trunk's feature-map side"
        yield "dim", self.dim >= 1, "an integer >= 1 divisible by model.heads"
        yield "heads", self.heads >= 1 and self.dim % self.heads == 0, f"an integer >= 1 dividing model.dim={self.dim}"
        yield "mlp_ratio", self.mlp_ratio > 0, "a float > 0"
        yield "code_size", self.code_size is None or self.code_size >= 1, "an integer >= 1, or null (no code layer)"

    def rules_in(self, config: Config) -> Iterator[Rule]:
        size = config.data.img_size
        side = trunk_side(size)
        allowed = f"a divisor of the trunk's feature-map side {side} (data.img_size={size} / 32, rounded up)"
        yield "model.patch_size", side % self.patch_size == 0, allowed


class GraphAttention(nn.Module):
    """Seed 002's graph attention, GAT's (Veličković et al. 2018) on the complete graph of the nodes:
    z = W h, e_ij = σ(a^T [z_i || z_j]), A = softmax_j(e), and node i's output is Σ_j A_ij z_j.

    a^T [z_i || z_j] is a_1·z_i + a_2·z_j, which is the seed's A = softmax(σ(W_K^T H + H^T W_Q)): one score per
    node and role, added over each pair, so the whole matrix costs one product per node. One head, no bias,
    as the seed's. With a monotone σ every node ranks the others alike (GATv2's "static attention"): that is
    the seed's model, kept as it is.
    """

    def __init__(self, dim: int, activation: str = "leaky_relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        self.w = nn.Linear(dim, dim, bias=False)
        self.a = nn.Linear(2 * dim, 1, bias=False)
        self.activation = ACTIVATIONS[activation]()

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        """(batch, nodes, nodes): softmax_j(σ(a^T [z_i || z_j])) for projected nodes z."""
        a_i, a_j = self.a.weight.view(2, -1)
        return torch.softmax(self.activation((z @ a_i)[:, :, None] + (z @ a_j)[:, None, :]), dim=-1)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, 1, nodes, nodes): the attention matrix, shaped as the classic attention's (one head)."""
        return self.scores(self.w(x)).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.w(x)
        return self.scores(z) @ z


class ResNetAttention(HeadFinetuning):
    """ResNet-18's trunk (`trunk`: conv1 .. layer4, torchvision's names and weights), its feature map cut into
    nodes by a Conv2d with kernel = stride = patch_size (`patchify`), one pre-norm ViT block whose attention is
    classic or graph (`block`), a final LayerNorm (`norm`), the mean over nodes, an optional code layer (`code`)
    and the classifier (`head`).

    There are no position embeddings: the block and the mean make the new part a function of the set of node
    features, which is what the seed's graph view asks of it. The new part is initialised as the ViT (truncated
    normal linear layers, the classifier at zero).
    """

    head_modules = ("patchify", "block", "norm", "code", "head")

    def __init__(
        self,
        trunk: nn.Sequential,
        num_classes: int,
        attention: str = "classic",
        activation: str = "leaky_relu",
        patch_size: int = 1,
        dim: int = 256,
        heads: int = 8,
        mlp_ratio: float = 2.0,
        code_size: int | None = None,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention {attention!r} is not one of {', '.join(ATTENTIONS)}")
        self.trunk = trunk
        self.patchify = nn.Conv2d(TRUNK_WIDTH, dim, kernel_size=patch_size, stride=patch_size)
        attn = GraphAttention(dim, activation) if attention == "graph" else None  # None: the ViT's attention
        self.block = Block(dim, heads, mlp_ratio, 0.0, eps, attn=attn)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.code = nn.Linear(dim, code_size) if code_size is not None else None
        self.head = nn.Linear(code_size or dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The new part, as the ViT's; the trunk keeps torchvision's initialisation (or its loaded weights)."""
        for part in (self.block, self.code, self.head):
            for module in part.modules() if part is not None else ():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
        fan_in = math.prod(self.patchify.weight.shape[1:])
        nn.init.trunc_normal_(self.patchify.weight, std=(1 / fan_in) ** 0.5)
        nn.init.zeros_(self.patchify.bias)
        nn.init.zeros_(self.head.weight)

    def nodes(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, nodes, dim): the trunk's feature map, one node per patch (row-major)."""
        return self.patchify(self.trunk(images)).flatten(2).transpose(1, 2)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The mean over the attended, normed nodes, through the code layer if there is one."""
        x = self.norm(self.block(self.nodes(images))).mean(dim=1)
        return self.code(x) if self.code is not None else x

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.head(embedding)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embed(images))


def resnet18_trunk(pretrained: bool = False) -> nn.Sequential:
    """ResNet-18's layers up to its pooling, under torchvision's names (so its state dict loads key for key),
    with the ImageNet weights if `pretrained` (loaded, and failing, as `model=resnet18`'s)."""
    resnet = ResNet18(num_classes=1000)
    if pretrained:
        load_imagenet_resnet18(resnet)
    return nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in TRUNK))


@MODELS.register("resnet18_attn", ResNetAttnConfig)
def build_resnet18_attn(cfg: ResNetAttnConfig, num_classes: int, img_size: int) -> nn.Module:
    if trunk_side(img_size) % cfg.patch_size:
        raise ValueError(f"patch_size {cfg.patch_size} does not divide the {trunk_side(img_size)}-cell feature map")
    return ResNetAttention(
        resnet18_trunk(cfg.pretrained),
        num_classes,
        attention=cfg.attention,
        activation=cfg.activation,
        patch_size=cfg.patch_size,
        dim=cfg.dim,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        code_size=cfg.code_size,
    )
