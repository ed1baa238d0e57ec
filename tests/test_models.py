"""The scratch ViT is a real ViT (logit parity with torchvision's), and ResNet-18 is wired correctly."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from torchvision.models import VisionTransformer as TorchvisionViT
from torchvision.models import resnet18

from tests.conftest import CONF, REPO
from vitexp import models
from vitexp.config import ConfigError, validate
from vitexp.groups import register_schemas
from vitexp.models import (
    MODELS,
    PretrainedWeightsError,
    ResNetConfig,
    VisionTransformer,
    ViTConfig,
    build_model,
    count_parameters,
    param_groups,
)


def copy_torchvision_vit(tv: TorchvisionViT, ours: VisionTransformer) -> None:
    """Map torchvision's parameter names onto ours (fused qkv = nn.MultiheadAttention's in_proj)."""
    mapping = {
        "conv_proj": "patch_embed",
        "class_token": "cls_token",
        "encoder.pos_embedding": "pos_embed",
        "encoder.ln": "norm",
        "heads.head": "head",
    }
    state = {}
    for name, value in tv.state_dict().items():
        new = name
        for old, replacement in mapping.items():
            new = new.replace(old, replacement) if name.startswith(old) else new
        if name.startswith("encoder.layers.encoder_layer_"):
            index, rest = name.removeprefix("encoder.layers.encoder_layer_").split(".", 1)
            rest = (
                rest.replace("ln_1", "norm1")
                .replace("ln_2", "norm2")
                .replace("self_attention.in_proj_weight", "attn.qkv.weight")
                .replace("self_attention.in_proj_bias", "attn.qkv.bias")
                .replace("self_attention.out_proj", "attn.proj")
            )
            new = f"blocks.{index}.{rest}"
        state[new] = value
    ours.load_state_dict(state, strict=True)


@pytest.mark.parametrize("img_size,patch,dim,depth,heads,mlp_ratio", [(32, 8, 64, 3, 4, 2.0), (48, 16, 96, 2, 3, 4.0)])
def test_vit_matches_torchvision_logits(img_size, patch, dim, depth, heads, mlp_ratio) -> None:
    torch.manual_seed(0)
    tv = TorchvisionViT(img_size, patch, depth, heads, dim, int(dim * mlp_ratio), num_classes=7).eval()
    for param in tv.parameters():  # torchvision zero-initialises some tensors: randomise everything
        torch.nn.init.normal_(param, std=0.1)
    ours = VisionTransformer(img_size, patch, 7, dim, depth, heads, mlp_ratio).eval()
    copy_torchvision_vit(tv, ours)
    assert count_parameters(ours) == count_parameters(tv)
    images = torch.randn(4, 3, img_size, img_size)
    with torch.no_grad():
        expected, got = tv(images), ours(images)
    assert expected.abs().mean() > 0.1  # a meaningful comparison, not of zeros
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_vit_shapes_and_no_decay_groups() -> None:
    model = build_model(ViTConfig(dim=32, depth=2, heads=4, patch_size=4), num_classes=37, img_size=16)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 37)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in no_decay_ids}
    assert {"cls_token", "pos_embed", "norm.weight", "norm.bias", "head.bias", "blocks.0.attn.qkv.bias"} <= names
    assert not any(name.endswith(".weight") and "norm" not in name for name in names)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_resnet18_head_matches_num_classes() -> None:
    model = build_model(ResNetConfig(), num_classes=37, img_size=64)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 37)
    assert count_parameters(model) == 11_195_493  # 11,176,512 trunk + 512*37+37 head


def test_pretrained_resnet_without_network_says_where_to_put_weights(monkeypatch, tmp_path: Path) -> None:
    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(PretrainedWeightsError) as info:
        build_model(ResNetConfig(pretrained=True), num_classes=37, img_size=64)
    expected = tmp_path / ".torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert str(expected) in str(info.value)
    assert "resnet18-f37072fd.pth" in str(info.value) and "TORCH_HOME" in str(info.value)


def test_pretrained_resnet_loads_cached_weights(tmp_path: Path) -> None:
    torch.manual_seed(1)
    imagenet = resnet18()
    cache = tmp_path / ".torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cache.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), cache)
    model = build_model(ResNetConfig(pretrained=True), num_classes=37, img_size=64)
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(model.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    assert model.fc.out_features == 37


@pytest.mark.parametrize("option", list(MODELS), ids=lambda option: option.name)
def test_every_registered_model_keeps_the_model_contract(option) -> None:
    """What the engine relies on, for any model a contributor registers with its default settings."""
    torch.manual_seed(0)
    model = MODELS.build(option.schema(), num_classes=7, img_size=32)
    images = torch.randn(3, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (3, 7)
    logits.square().mean().backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)

    decay, no_decay = param_groups(model, weight_decay=0.05)
    names = {id(p): name for name, p in trainable}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    tokens = set(getattr(model, "no_weight_decay", ()))
    for p in decay["params"]:  # weight matrices and kernels only
        assert p.ndim > 1 and names[id(p)] not in tokens, names[id(p)]
    for p in no_decay["params"]:  # norms, biases, tokens, positions
        assert p.ndim <= 1 or names[id(p)] in tokens, names[id(p)]

    copy = MODELS.build(option.schema(), num_classes=7, img_size=32)
    copy.load_state_dict(model.state_dict())
    model.eval()
    copy.eval()
    with torch.no_grad():
        assert torch.equal(model(images), copy(images))


def test_a_config_of_another_schema_is_refused_not_built_as_the_registered_one() -> None:
    @dataclass
    class AttentionResNetConfig(ResNetConfig):  # a new model that forgot to register under its own name
        attention: str = "classic"

    with pytest.raises(ConfigError, match=r"'resnet18' is built from the schema ResNetConfig, not from Attention"):
        build_model(AttentionResNetConfig(), num_classes=7, img_size=32)


def test_the_readme_example_adds_a_model(tmp_path: Path) -> None:
    """The README's "Adding a model": its Python and its YAML, as written there, make a working option."""
    section = (REPO / "README.md").read_text().split("**Adding a model**", 1)[1]
    python_code, yaml_text = re.findall(r"```(?:python|yaml)\n(.*?)```", section, re.S)[:2]
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "model" / "small_cnn.yaml").write_text(yaml_text)
    namespace = vars(models).copy()
    try:
        exec(python_code, namespace)
        register_schemas()
        with initialize_config_dir(config_dir=str(conf), version_base=None):
            cfg = validate(compose("config", overrides=["model=small_cnn", "model.width=16", "data=digits"]))
        model = build_model(cfg.model, num_classes=10, img_size=cfg.data.img_size)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10) and model[0].out_channels == 16
    finally:  # other tests enumerate the registry
        MODELS.options.pop("small_cnn", None)
        ConfigStore.instance().repo["schema"]["model"].pop("small_cnn.yaml", None)
