"""Seed 002's ResNet-18 with an attention block: the graph attention is the seed's formula pair by pair, the
classic one is scaled dot-product attention, the trunk is ResNet-18's (its weights load key for key), and a
frozen trunk stays bit-identical while the new block trains through the engine on digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import sklearn.datasets
import sklearn.utils
import torch
import torch.nn.functional as F
from torchvision.models import resnet18

from tests.conftest import TINY
from vitexp import checkpoint, run
from vitexp.config import ConfigError, validate
from vitexp.models import PretrainedWeightsError, build_model, count_parameters, is_head
from vitexp.resnet_attn import ACTIVATIONS, GraphAttention, ResNetAttnConfig, trunk_side
from vitexp.run import RunIdentity

TRUNK_PARAMS = 11_176_512  # torchvision's ResNet-18 (11,689,512) without its fc (513,000)


def randomise(module: torch.nn.Module) -> None:
    """Every parameter drawn at a scale where the attention is far from uniform."""
    for param in module.parameters():
        torch.nn.init.normal_(param, std=0.5)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_graph_attention_is_the_seeds_formula_pair_by_pair(activation: str) -> None:
    """A_ij = softmax_j(σ(a^T [W h_i || W h_j])), computed for each pair of nodes in Python, and each node's
    output is the attention-weighted sum of the projected nodes."""
    torch.manual_seed(0)
    attn = GraphAttention(6, activation)
    randomise(attn)
    h = torch.randn(2, 5, 6)
    sigma = ACTIVATIONS[activation]()
    a, w = attn.a.weight[0], attn.w.weight
    expected = torch.empty(2, 5, 5)
    with torch.no_grad():
        for b in range(2):
            for i in range(5):
                e = torch.stack([sigma(a @ torch.cat([w @ h[b, i], w @ h[b, j]])) for j in range(5)])
                expected[b, i] = torch.exp(e) / torch.exp(e).sum()
        got = attn.weights(h)
        assert got.shape == (2, 1, 5, 5)
        torch.testing.assert_close(got[:, 0], expected)
        assert (expected.amax(-1) - expected.amin(-1)).max() > 0.1  # not a uniform matrix
        torch.testing.assert_close(attn(h), expected @ (h @ w.T))


def test_the_classic_block_is_scaled_dot_product_attention() -> None:
    """The ViT's block on the nodes: x + proj(softmax(q k^T / sqrt(d_head)) v) per head, then x + mlp(norm(x))."""
    torch.manual_seed(0)
    model = build_model(ResNetAttnConfig(dim=16, heads=4), num_classes=5, img_size=64).eval()
    block, attn = model.block, model.block.attn
    randomise(block)
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        y = block.norm1(x)
        q, k, v = (t.reshape(2, 4, 4, 4).transpose(1, 2) for t in attn.qkv(y).split(16, dim=-1))
        weights = torch.softmax(q @ k.transpose(-2, -1) / 4**0.5, dim=-1)
        torch.testing.assert_close(attn.weights(y), weights)
        torch.testing.assert_close(weights @ v, F.scaled_dot_product_attention(q, k, v))
        mid = x + attn.proj((weights @ v).transpose(1, 2).reshape(2, 4, 16))
        torch.testing.assert_close(block(x), mid + block.mlp(block.norm2(mid)))
        assert (weights.amax(-1) - weights.amin(-1)).max() > 0.1


@pytest.mark.parametrize("img_size", [16, 33, 40, 64, 100, 224])
def test_the_trunk_map_has_the_side_the_rules_assume(img_size: int) -> None:
    model = build_model(ResNetAttnConfig(dim=8, heads=1), num_classes=3, img_size=img_size).eval()
    with torch.no_grad():
        assert model.trunk(torch.zeros(1, 3, img_size, img_size)).shape == (1, 512, *[trunk_side(img_size)] * 2)


def test_a_resnet18_state_dict_loads_unchanged_into_the_trunk() -> None:
    torch.manual_seed(1)
    imagenet = resnet18().state_dict()
    trunk = {name: value for name, value in imagenet.items() if not name.startswith("fc.")}
    model = build_model(ResNetAttnConfig(), num_classes=10, img_size=64)
    assert model.trunk.state_dict().keys() == trunk.keys()
    model.trunk.load_state_dict(trunk, strict=True)
    assert all(torch.equal(value, trunk[name]) for name, value in model.trunk.state_dict().items())


def test_pretrained_loads_the_cached_imagenet_weights_into_the_trunk(tmp_path: Path) -> None:
    """model.pretrained=true loads as model=resnet18 does: from TORCH_HOME's cache (a random stand-in here)."""
    torch.manual_seed(1)
    imagenet = resnet18().state_dict()
    cache = tmp_path / ".torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cache.parent.mkdir(parents=True)
    torch.save(imagenet, cache)
    model = build_model(ResNetAttnConfig(pretrained=True, attention="graph"), num_classes=10, img_size=64)
    state = model.trunk.state_dict()
    assert all(torch.equal(value, imagenet[name]) for name, value in state.items())
    assert len(state) == len(imagenet) - 2  # everything but fc.weight and fc.bias


def test_pretrained_without_network_says_where_to_put_weights(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(PretrainedWeightsError, match="resnet18-f37072fd.pth.*TORCH_HOME"):
        build_model(ResNetAttnConfig(pretrained=True), num_classes=10, img_size=64)


@pytest.mark.parametrize(
    "cfg,new",
    [
        # patchify 512*256+256; block: 2 norms, qkv 256*768+768, proj 256*256+256, MLP 256->512->256; norm; head
        (ResNetAttnConfig(), 131_328 + 1_024 + 197_376 + 65_792 + 262_912 + 512 + 2_570),
        # the graph attention instead: W 256*256 and a 2*256, no biases
        (ResNetAttnConfig(attention="graph"), 131_328 + 1_024 + 65_536 + 512 + 262_912 + 512 + 2_570),
        # patches of 7x7 cells, a 64-wide code: patchify 512*49*256+256, head 256*64+64 then 64*10+10
        (ResNetAttnConfig(patch_size=7, code_size=64), 6_422_784 + 1_024 + 197_376 + 65_792 + 262_912 + 512 + 17_098),
    ],
    ids=["classic", "graph", "patch7-code"],
)
def test_parameter_counts(cfg: ResNetAttnConfig, new: int) -> None:
    model = build_model(cfg, num_classes=10, img_size=224)
    assert count_parameters(model.trunk) == TRUNK_PARAMS
    assert count_parameters(model) == TRUNK_PARAMS + new


def test_the_head_is_everything_after_the_trunk() -> None:
    model = build_model(ResNetAttnConfig(attention="graph", code_size=16, freeze="backbone"), 10, 64)
    for name, param in model.named_parameters():
        assert param.requires_grad == is_head(model, name) == (not name.startswith("trunk.")), name
    assert count_parameters(model, trainable=True) == count_parameters(model) - TRUNK_PARAMS
    model.train()
    assert model.block.training and not model.trunk.training and not model.trunk.bn1.training


def test_a_frozen_trunk_stays_bit_identical_while_the_attention_block_trains(
    make_cfg, tmp_path: Path, monkeypatch
) -> None:
    """Through the engine on digits at 33 px (a 2x2 map: four nodes, so the attention has something to weigh):
    every parameter after the trunk moves, nothing of the trunk does (BatchNorm statistics included). A quarter
    of the digits keeps the ResNet's forward passes short."""
    digits = sklearn.datasets.load_digits()
    quarter = sklearn.utils.Bunch(images=digits.images[:450], target=digits.target[:450])
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda: quarter)
    overrides = [o for o in TINY if not o.startswith("model.") and not o.startswith("data.img_size")]
    cfg = make_cfg(
        "model=resnet18_attn",
        *overrides,
        "model.attention=graph",
        "model.dim=32",
        "model.freeze=backbone",
        "data=digits",
        "data.img_size=33",
        "data.batch_size=32",
        "trainer.epochs=1",
        "sched.warmup_epochs=0",
    )
    typed = validate(cfg)
    torch.manual_seed(typed.seed)
    before = {k: v.clone() for k, v in build_model(typed.model, 10, typed.data.img_size).state_dict().items()}
    run.run(cfg, tmp_path / "run", RunIdentity({}))
    state = checkpoint.load(tmp_path / "run" / "last.pt")
    after = state["model"]
    assert after.keys() == before.keys() and state["progress"]["step"] >= 5
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    assert moved == {name for name in before if not name.startswith("trunk.")}
    assert "block.attn.a.weight" in moved and "block.attn.w.weight" in moved


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.attention=linear", "model.attention='linear' is not allowed: expected one of classic, graph"),
        ("model.activation=swish", "model.activation='swish' is not allowed: expected one of leaky_relu, relu"),
        ("model.heads=7", "model.heads=7 is not allowed: expected an integer >= 1 dividing model.dim=256"),
        (
            "model.patch_size=2",
            "model.patch_size=2 is not allowed: expected a divisor of the trunk's feature-map side 7",
        ),
        ("model.code_size=0", "model.code_size=0 is not allowed: expected an integer >= 1, or null"),
        ("model.mlp_ratio=0", "model.mlp_ratio=0.0 is not allowed: expected a float > 0"),
    ],
)
def test_range_rules_name_the_key(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(make_cfg("model=resnet18_attn", override))
    assert message in str(info.value)
    typed = validate(
        make_cfg("model=resnet18_attn", "model.attention=graph", "model.activation=elu", "model.patch_size=7")
    )
    assert (typed.model.attention, typed.model.activation, typed.model.patch_size) == ("graph", "elu", 7)
