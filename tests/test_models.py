"""The scratch ViT is a real ViT (logit parity with torchvision's), ResNet-18 is wired correctly, seed 001's CNN
has the seed's size, and every model's embedding is what its classifier reads."""

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

from tests.conftest import CONF, REPO, TINY
from vitexp import checkpoint, models, run
from vitexp.config import ConfigError, validate
from vitexp.engine import Trainer
from vitexp.groups import register_schemas
from vitexp.models import (
    MODELS,
    Block,
    CNNConfig,
    ConvEncoder,
    PretrainedWeightsError,
    ResNetConfig,
    VisionTransformer,
    ViTConfig,
    build_model,
    count_parameters,
    embed,
    param_groups,
)
from vitexp.resnet_attn import ResNetAttnConfig
from vitexp.run import RunIdentity


def copy_torchvision_vit(
    tv: TorchvisionViT, ours: VisionTransformer, classifier: torch.nn.Linear | None = None
) -> None:
    """Map torchvision's parameter names onto ours (fused qkv = nn.MultiheadAttention's in_proj); with a
    `classifier` after torchvision's head (seed 001's code layer), its head is our `code`."""
    mapping = {
        "conv_proj": "patch_embed",
        "class_token": "cls_token",
        "encoder.pos_embedding": "pos_embed",
        "encoder.ln": "norm",
        "heads.head": "code" if classifier is not None else "head",
    }
    state = {} if classifier is None else {f"head.{name}": value for name, value in classifier.state_dict().items()}
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


# --- model sizes the seeds quote -------------------------------------------------------------------------
# Seed 001 (FMNIST, torchvision's VisionTransformer(num_classes=code) + Linear(code, 10), 28 px, patch 7):
# (depth, heads, dim, MLP width, code size, parameters) as its table lists them.
SEED_001 = [
    (4, 16, 256, 512, 128, 2_185_610),
    (4, 8, 256, 512, 128, 2_185_610),
    (4, 32, 256, 512, 128, 2_185_610),
    (4, 4, 256, 512, 128, 2_185_610),
    (8, 8, 256, 512, 128, 4_294_026),
    (8, 16, 256, 512, 128, 4_294_026),
    (8, 16, 256, 512, 784, 4_469_178),
    (8, 8, 256, 1024, 128, 6_395_274),
    (16, 8, 256, 512, 128, 8_510_858),
    (8, 12, 768, 512, 128, 25_453_962),
]


@pytest.mark.parametrize("depth,heads,dim,mlp,code,params", SEED_001, ids=lambda v: str(v))
def test_vit_with_a_code_layer_has_seed_001s_parameter_counts(depth, heads, dim, mlp, code, params) -> None:
    cfg = ViTConfig(patch_size=7, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp / dim, code_size=code)
    model = build_model(cfg, num_classes=10, img_size=28)
    assert count_parameters(model) == params
    assert model.blocks[0].mlp[0].out_features == mlp


def test_vit_b16_has_torchvisions_parameter_count() -> None:
    """Seed 000's ViT-B/16 on Pets: torchvision's vit_b_16 shape with 37 classes."""
    cfg = ViTConfig(patch_size=16, dim=768, depth=12, heads=12, mlp_ratio=4.0)
    assert count_parameters(build_model(cfg, num_classes=37, img_size=224)) == 85_827_109


def test_the_code_layer_is_torchvisions_head_then_a_linear_classifier() -> None:
    """code_size=C is seed 001's model: torchvision's ViT with num_classes=C, then nn.Linear(C, classes)."""
    torch.manual_seed(0)
    tv = TorchvisionViT(28, 7, 2, 4, 32, 64, num_classes=24).eval()
    for param in tv.parameters():
        torch.nn.init.normal_(param, std=0.1)
    classifier = torch.nn.Linear(24, 10)
    ours = build_model(ViTConfig(patch_size=7, dim=32, depth=2, heads=4, code_size=24), 10, 28).eval()
    assert (ours.code.in_features, ours.code.out_features, ours.head.in_features) == (32, 24, 24)
    copy_torchvision_vit(tv, ours, classifier)
    images = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        expected, got = classifier(tv(images)), ours(images)
    assert expected.abs().mean() > 0.05
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_the_new_keys_at_their_defaults_build_exactly_the_model_of_before() -> None:
    """No code layer, no stochastic-depth module that draws, and the same initial weights."""
    torch.manual_seed(0)
    model = build_model(ViTConfig(dim=32, depth=3, heads=2, patch_size=8), 10, 16)
    assert model.code is None and not any(name.startswith("code") for name, _ in model.named_parameters())
    assert all(isinstance(block.drop_path, torch.nn.Identity) for block in model.blocks)
    torch.manual_seed(0)
    with_drop_path = build_model(ViTConfig(dim=32, depth=3, heads=2, patch_size=8, drop_path=0.3), 10, 16)
    assert model.state_dict().keys() == with_drop_path.state_dict().keys()
    for name, value in model.state_dict().items():  # drop_path draws nothing at construction
        assert torch.equal(value, with_drop_path.state_dict()[name]), name


# --- stochastic depth --------------------------------------------------------------------------------------
def test_drop_path_rates_grow_linearly_over_the_blocks_as_timm() -> None:
    model = build_model(ViTConfig(dim=32, depth=4, heads=2, patch_size=8, drop_path=0.3), 10, 16)
    expected = [x.item() for x in torch.linspace(0, 0.3, 4)]
    assert isinstance(model.blocks[0].drop_path, torch.nn.Identity)  # rate 0: nothing drawn
    assert [block.drop_path.p for block in model.blocks[1:]] == expected[1:]
    assert all(block.drop_path.mode == "row" for block in model.blocks[1:])


def test_drop_path_zero_draws_no_random_numbers_in_training() -> None:
    model = build_model(ViTConfig(dim=32, depth=2, heads=2, patch_size=8), 10, 16).train()
    images = torch.randn(4, 3, 16, 16)
    state = torch.get_rng_state()
    model(images)
    assert torch.equal(torch.get_rng_state(), state)


def test_drop_path_drops_each_sample_s_branches_and_scales_the_kept_ones() -> None:
    """Per sample and per branch: 0 with probability p, else branch / (1 - p); drawn from the global generator."""
    torch.manual_seed(0)
    block, p = Block(16, 2, 2.0, 0.0, 1e-6, drop_path=0.4).train(), 0.4
    x = torch.randn(64, 5, 16)
    torch.manual_seed(7)
    got = block(x)
    torch.manual_seed(7)
    keep1 = torch.empty(64, 1, 1).bernoulli_(1 - p) / (1 - p)
    keep2 = torch.empty(64, 1, 1).bernoulli_(1 - p) / (1 - p)
    with torch.no_grad():
        mid = x + keep1 * block.attn(block.norm1(x))
        expected = mid + keep2 * block.mlp(block.norm2(mid))
    torch.testing.assert_close(got, expected)
    assert 0 < (keep1 == 0).sum() < 64 and not torch.equal(keep1, keep2)
    block.eval()  # off in evaluation: the plain block
    with torch.no_grad():
        mid = x + block.attn(block.norm1(x))
        torch.testing.assert_close(block(x), mid + block.mlp(block.norm2(mid)))


def test_a_run_with_drop_path_resumes_exactly(make_cfg, tmp_path: Path, monkeypatch) -> None:
    """The drop decisions come from torch's generator, which the checkpoint keeps: resuming mid-epoch trains
    exactly the weights of an uninterrupted run (and they differ from a run without stochastic depth)."""
    overrides = [*TINY, "data=digits", "trainer.epochs=2", "data.batch_size=128", "model.depth=3"]

    def fit(name: str, *extra: str) -> dict[str, torch.Tensor]:
        run.run(make_cfg(*overrides, *extra), tmp_path / name, RunIdentity({}))
        return checkpoint.load(tmp_path / name / "last.pt")["model"]

    straight = fit("straight", "model.drop_path=0.5")
    original_step = Trainer.optimizer_step

    def stop_after_3_steps(self: Trainer, finite: torch.Tensor) -> None:
        original_step(self, finite)
        if self.progress.step == 3:
            self.stop_requested = True

    monkeypatch.setattr(Trainer, "optimizer_step", stop_after_3_steps)
    fit("resumed", "model.drop_path=0.5")
    monkeypatch.setattr(Trainer, "optimizer_step", original_step)
    resumed = fit("resumed", "model.drop_path=0.5")
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    plain = fit("plain")
    assert not torch.equal(plain["head.weight"], straight["head.weight"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.drop_path=1.0", "model.drop_path=1.0 is not allowed: expected a float in [0, 1)"),
        ("model.drop_path=-0.1", "model.drop_path=-0.1 is not allowed: expected a float in [0, 1)"),
        ("model.code_size=0", "model.code_size=0 is not allowed: expected an integer >= 1, or null"),
        ("model.freeze=head", "model.freeze='head' is not allowed: expected one of none, backbone"),
    ],
)
def test_vit_range_rules_name_the_key(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(make_cfg(override))
    assert message in str(info.value)
    typed = validate(make_cfg("model.drop_path=0.1", "model.code_size=128", "model.freeze=backbone"))
    assert (typed.model.drop_path, typed.model.code_size, typed.model.freeze) == (0.1, 128, "backbone")


# --- seed 001's CNN ----------------------------------------------------------------------------------------
def test_the_cnn_has_seed_001s_parameter_count() -> None:
    """Seed 001's "CNN (light green) ... 2,002,698": 3x3 unpadded convolutions 1->32->32->32 with ReLU on 28 px
    FMNIST (one channel), flattened 22*22*32 into a 128-wide code, then 10 classes. Our images are RGB: 576 more."""
    seed = ConvEncoder(28, 10, [32, 32, 32], kernel_size=3, code_size=128, in_channels=1)
    assert count_parameters(seed) == 2_002_698
    assert (seed.code.in_features, seed.code.out_features) == (22 * 22 * 32, 128)
    model = build_model(CNNConfig(), num_classes=10, img_size=28)
    assert count_parameters(model) == 2_002_698 + 2 * 32 * 3 * 3 == 2_003_274
    assert [m.kernel_size for m in model.convs if isinstance(m, torch.nn.Conv2d)] == [(3, 3)] * 3
    assert sum(isinstance(m, torch.nn.ReLU) for m in model.convs) == 3
    without_code = build_model(CNNConfig(code_size=None, channels=[8, 16]), num_classes=10, img_size=12)
    assert without_code.code is None and without_code.head.in_features == 16 * 8 * 8


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.channels=[]"], "model.channels=[] is not allowed: expected a non-empty list of integers >= 1"),
        (["model.channels=[32,0]"], "model.channels=[32, 0] is not allowed: expected a non-empty list"),
        (["model.kernel_size=0"], "model.kernel_size=0 is not allowed: expected an integer >= 1"),
        (["model.code_size=0"], "model.code_size=0 is not allowed: expected an integer >= 1, or null"),
        (["model.kernel_size=5", "data=digits", "data.img_size=12"], "data.img_size=12 is not allowed: expected more"),
    ],
)
def test_cnn_range_rules_name_the_key(make_cfg, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(make_cfg("model=cnn", *overrides))
    assert message in str(info.value)
    typed = validate(make_cfg("model=cnn", "model.channels=[16,16]", "model.code_size=null"))
    assert (typed.model.channels, typed.model.code_size, typed.model.kernel_size) == ([16, 16], None, 3)


# --- embeddings --------------------------------------------------------------------------------------------
EMBEDDINGS = {  # config, the classifier of the embedding, its width
    "vit": (ViTConfig(dim=32, depth=2, heads=2, patch_size=8), lambda m: m.head, 32),
    "vit-code": (ViTConfig(dim=32, depth=2, heads=2, patch_size=8, code_size=12), lambda m: m.head, 12),
    "resnet18": (ResNetConfig(), lambda m: m.fc, 512),
    "resnet18-code": (ResNetConfig(code_size=24), lambda m: m.fc[1], 24),
    "cnn": (CNNConfig(channels=[8, 8]), lambda m: m.head, 128),
    "cnn-no-code": (CNNConfig(channels=[8, 8], code_size=None), lambda m: m.head, 8 * 28 * 28),
    "resnet18_attn": (ResNetAttnConfig(dim=32, heads=4), lambda m: m.head, 32),
    "resnet18_attn-graph-code": (ResNetAttnConfig(dim=32, attention="graph", code_size=20), lambda m: m.head, 20),
}


@pytest.mark.parametrize("name", list(EMBEDDINGS))
def test_the_classifier_of_the_embedding_is_the_model(name: str) -> None:
    """What a probe reads (`embed`) is exactly what the classifier reads: head(embed(x)) is forward(x), bit for bit."""
    cfg, classifier, width = EMBEDDINGS[name]
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=7, img_size=32).eval()
    for param in classifier(model).parameters():  # the ViT's classifier starts at zero: make it tell
        torch.nn.init.normal_(param)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        embedding, logits = embed(model, images), model(images)
        assert embedding.shape == (3, width) and logits.abs().mean() > 0
        assert torch.equal(classifier(model)(embedding), logits)
        assert torch.equal(model.classify(model.embed(images)), logits)


def test_every_registered_model_has_an_embedding() -> None:
    for option in MODELS:
        model = MODELS.build(option.schema(), num_classes=7, img_size=32).eval()
        with torch.no_grad():
            assert embed(model, torch.randn(2, 3, 32, 32)).ndim == 2, option.name


def test_a_model_without_an_embedding_is_refused() -> None:
    with pytest.raises(ConfigError, match="Sequential does not say which of its outputs is its embedding"):
        embed(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)), torch.randn(1, 3, 2, 2))
