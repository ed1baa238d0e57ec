"""Attributions: which pixels a finished run's predictions rest on, as one PNG grid to look at.

Accuracy says how often a model is right, not on what grounds: a Pets classifier may look at the animal or
at the sofa behind it. `python -m vitexp.explain <run dir> [explain.n=8 explain.method=integrated_gradients
explain.split=test explain.classes=... explain.out=FILE]` loads the run's `best.pt` (the weights its test
ran on, and the config they were trained with), takes `n` images of a split, and draws each one as the model
saw it (center crop, normalisation undone) with its true and predicted labels, the confidence, and the
attribution to the explained class overlaid as a heatmap. It writes `<run dir>/explain_<method>.png` and
nothing else, and refuses to replace an existing file unless `explain.overwrite=true`.

Methods: Captum's integrated gradients, saliency and occlusion (seed 002's figures), for any model; and
attention rollout (Abnar & Zuidema 2020) for the ViT. `Attention` runs PyTorch's fused SDPA kernel, which
returns no attention weights, so rollout hooks each block's `qkv` projection and recomputes
softmax(QK^T / sqrt(d)) from its output: the model code stays as it is, and rollout needs no Captum. Captum
is imported inside the functions that use it, so it costs `import vitexp` and a training run nothing.

Every heatmap is the absolute attribution per pixel (channels summed first), scaled per image from its minimum
to its 99th percentile: it shows where an image's evidence lies, not how strong it is next to another image's.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from vitexp import checkpoint
from vitexp.augment import center_crop
from vitexp.checkpoint import BEST_FILE, LAST_FILE, CheckpointError
from vitexp.cli import parse_tool_args, run_tool, write_output
from vitexp.config import ConfigError, DataConfig, ModelConfig, Rule
from vitexp.device import select_device
from vitexp.registry import Registry

log = logging.getLogger("vitexp")
PREFIX = "explain."
METHODS = ("integrated_gradients", "saliency", "occlusion", "attention_rollout")
SPLITS = ("train", "val", "test")
TARGETS = ("pred", "true")
MAX_IMAGES = 64
CAPTUM_PIN = "captum==0.9.0"  # as requirements.txt pins it, for the error that says how to install it


@dataclass
class ExplainConfig:
    """`explain.*` keys; every other argument but the run directory is refused."""

    n: int = 8  # images in the grid (fewer if the split has fewer of the chosen classes)
    method: str = "integrated_gradients"  # integrated_gradients, saliency, occlusion or attention_rollout (ViT)
    split: str = "test"  # which split the images come from: train, val or test
    classes: str | None = None  # comma-separated class names or ids to take images of; None: every class
    target: str = "pred"  # the class attributed: pred (the model's prediction) or true (the label)
    out: str | None = None  # the PNG to write; None: <run dir>/explain_<method>.png
    overwrite: bool = False  # replace an existing output file (else that is an error and nothing is written)
    steps: int = 32  # integrated gradients: points on the path from the baseline (the mean colour) to the image
    window: int | None = None  # occlusion: side of the square occluded, in pixels; None: data.img_size // 8
    device: str = "auto"  # where the model runs: auto (CUDA if there is one), cpu, cuda, cuda:1
    data_root: str | None = None  # where the dataset lives, if not where the run read it (data.root)

    def rules(self) -> Iterator[Rule]:
        yield "n", 1 <= self.n <= MAX_IMAGES, f"an integer in [1, {MAX_IMAGES}]"
        yield "method", self.method in METHODS, f"one of {', '.join(METHODS)}"
        yield "split", self.split in SPLITS, f"one of {', '.join(SPLITS)}"
        yield "target", self.target in TARGETS, "pred (the predicted class) or true (the label)"
        yield "out", self.out is None or self.out.endswith(".png"), "a file name ending in .png"
        yield "steps", self.steps >= 2, "an integer >= 2"
        yield "window", self.window is None or self.window >= 1, "an integer >= 1, or null (data.img_size // 8)"


def parse_args(argv: Sequence[str]) -> tuple[Path, ExplainConfig]:
    """The run directory and the checked `explain.key=value` items; anything else is a ConfigError naming it."""
    cfg, run_dirs = parse_tool_args(argv, PREFIX, ExplainConfig)
    for arg in run_dirs:
        if "=" in arg and not Path(arg).exists():  # a run directory may have "=" in its name
            raise ConfigError(
                f"{arg.split('=')[0]} is not read by explain: it takes a run directory and {PREFIX}KEY=VALUE "
                "items (the run's own config comes from its checkpoint)"
            )
    if len(run_dirs) != 1:
        got = f"got {len(run_dirs)}: {' '.join(run_dirs)}" if run_dirs else "got none"
        raise ConfigError(f"expected one run directory (a train.py output directory holding {BEST_FILE}), {got}")
    return Path(run_dirs[0]), cfg


# --- the run: its weights, data and class names ----------------------------------------------------------
@dataclass
class LoadedRun:
    """A finished run's best weights in eval mode, with what evaluating them needs."""

    path: Path
    model: nn.Module
    model_name: str
    data: DataConfig
    split_data: Callable[[str], Dataset] = field(repr=False)
    class_names: list[str]


def require_run_dir(path: Path) -> Path:
    """`path`'s best.pt, or a ConfigError naming the path and what is missing (nothing is written)."""
    if not path.exists():
        raise ConfigError(f"{path} does not exist: expected a run directory of train.py holding {BEST_FILE}")
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory: expected a run directory of train.py holding {BEST_FILE}")
    best = path / BEST_FILE
    if not best.is_file():
        why = (
            f"it has {LAST_FILE}, but no epoch has validated with finite metrics yet (or {BEST_FILE} was removed)"
            if (path / LAST_FILE).exists()
            else "it is not a train.py run directory, or the run has not finished an epoch"
        )
        raise ConfigError(f"{path} holds no {BEST_FILE} (the best epoch's weights, which explain loads): {why}")
    return best


def group_config(registry: Registry[Any], stored: Any, group: str) -> Any:
    """The typed config of a group option from a run's stored (plain) config: its schema, filled with it.

    Keys added since the run was made keep their schema defaults, which do what the run did before them."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(stored, dict) or "name" not in stored:
        raise ConfigError(f"the run's config has no {group} option (expected {group}.name)")
    schema = registry[stored["name"]].schema
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), stored))
    except OmegaConfBaseException as err:
        raise ConfigError(f"the run's {group} config does not fit this version's {schema.__name__}: {err}") from None


def run_config(path: Path, best: dict[str, Any]) -> dict[str, Any]:
    """The config the weights were trained with: best.pt's own, else the run's `.hydra/config.yaml`."""
    if isinstance(best.get("config"), dict):
        return best["config"]
    recorded = path / ".hydra" / "config.yaml"
    if not recorded.exists():
        raise ConfigError(f"{path / BEST_FILE} holds no config and {recorded} is missing: cannot rebuild the model")
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(recorded), resolve=True)
    assert isinstance(config, dict)
    return config


def results_classes(path: Path) -> list[str] | None:
    """The class names results.json records (label id -> name), if the run finished."""
    results = path / "results.json"
    try:
        classes = json.loads(results.read_text()).get("classes") if results.exists() else None
    except (OSError, ValueError):
        return None
    return [str(name) for name in classes] if isinstance(classes, list) else None


def load_run(path: Path, cfg: ExplainConfig, device: torch.device) -> LoadedRun:
    """Rebuild the run's model from best.pt (its config and weights) and its dataset; refuse a non-run first."""
    from vitexp.data import DATASETS, build_splits
    from vitexp.models import MODELS, build_model

    best_path = require_run_dir(path)
    best = checkpoint.load(best_path)
    config = run_config(path, best)
    model_cfg: ModelConfig = group_config(MODELS, config.get("model"), "model")
    data_cfg: DataConfig = group_config(DATASETS, config.get("data"), "data")
    if cfg.data_root is not None:
        data_cfg.root = cfg.data_root
    splits = build_splits(data_cfg)
    model = build_model(model_cfg, splits.num_classes, data_cfg.img_size)
    try:
        model.load_state_dict(best["model"])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"{best_path} does not hold weights of its config's model ({err})") from None
    model.to(device).eval()
    names = results_classes(path)
    if names is None or len(names) != splits.num_classes:
        names = [str(name) for name in splits.class_names]
    names += [str(i) for i in range(len(names), splits.num_classes)]  # a label space wider than its names
    return LoadedRun(path, model, model_cfg.name, data_cfg, lambda split: getattr(splits, split), names)


def labels_of(dataset: Dataset) -> list[int]:
    """Every label of a split without decoding its images where the dataset keeps them apart."""
    if isinstance(dataset, TensorDataset):
        return [int(label) for label in dataset.tensors[1].tolist()]
    if isinstance(dataset, Subset):
        labels = labels_of(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    if hasattr(dataset, "labels"):
        return [int(label) for label in dataset.labels]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", " ").replace("-", " ")


def class_ids(spec: str | None, names: Sequence[str]) -> list[int]:
    """The ids `explain.classes` names (class names, any case, `_` for a space, or ids), in its order; None: all."""
    if spec is None:
        return list(range(len(names)))
    by_name = {_canonical(name): i for i, name in enumerate(names)}
    ids: list[int] = []
    for item in spec.strip().strip("[]").split(","):
        token = item.strip().strip("'\"")
        if not token:
            continue
        if _canonical(token) in by_name:
            found = by_name[_canonical(token)]
        elif token.isdigit() and int(token) < len(names):
            found = int(token)
        else:
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} classes)" if len(names) > 12 else "")
            raise ConfigError(
                f"{PREFIX}classes={spec!r} is not allowed: {token!r} is neither a class name nor an id in "
                f"[0, {len(names)}) (classes: {shown})"
            )
        if found not in ids:
            ids.append(found)
    if not ids:
        raise ConfigError(f"{PREFIX}classes={spec!r} is not allowed: expected class names or ids, comma-separated")
    return ids


def select_images(labels: Sequence[int], wanted: Sequence[int], n: int) -> list[int]:
    """Up to `n` indices, taking each wanted class's images in storage order in turn (round-robin), so that a
    grid of 8 from 37 classes shows 8 classes and one of two classes shows both equally; deterministic."""
    queues = {label: [i for i, y in enumerate(labels) if y == label] for label in wanted}
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n and any(len(queue) > depth for queue in queues.values()):
        chosen += [queue[depth] for queue in queues.values() if len(queue) > depth][: n - len(chosen)]
        depth += 1
    return chosen


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """0-255 images to the model's input, (x / 255 - mean) / std per channel, as training's evaluation does."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - m) / s


def unnormalize(inputs: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The model's input back as images in [0, 1], (N, 3, H, W): data.mean/std undone."""
    m = torch.tensor(mean, device=inputs.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=inputs.device).view(1, 3, 1, 1)
    return (inputs * s + m).clamp(0, 1)


# --- attributions ----------------------------------------------------------------------------------------
def attribute(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    method: str,
    steps: int = 32,
    window: int | None = None,
) -> torch.Tensor:
    """(N, H, W) non-negative attribution of each input's `targets` logit to its pixels (channels summed, then
    the absolute value); `inputs` are normalised (N, 3, H, W) images. The baseline of integrated gradients
    and the fill of occlusion is 0 in normalised space: the dataset's mean colour."""
    if method == "attention_rollout":
        return attention_rollout(model, inputs)
    if method not in METHODS:
        raise ConfigError(f"{PREFIX}method={method!r} is not allowed: expected one of {', '.join(METHODS)}")
    maps = [
        captum_attribution(model, inputs[i : i + 1], targets[i : i + 1], method, steps, window)
        for i in range(len(inputs))  # one image at a time: integrated gradients holds `steps` copies of it
    ]
    return torch.cat(maps).detach().sum(dim=1).abs()


def captum_attribution(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, method: str, steps: int, window: int | None
) -> torch.Tensor:
    """Captum's attribution of one batch, in the inputs' shape (N, 3, H, W)."""
    try:
        from captum.attr import IntegratedGradients, Occlusion, Saliency
    except ModuleNotFoundError:
        raise ConfigError(
            f"{PREFIX}method={method} needs Captum, which is not installed: pip install {CAPTUM_PIN} "
            "(explain.method=attention_rollout works without it)"
        ) from None
    inputs = inputs.detach().clone().requires_grad_()  # Captum would warn and set it itself
    if method == "integrated_gradients":
        ig = IntegratedGradients(model)
        return ig.attribute(inputs, baselines=0.0, target=targets, n_steps=steps, internal_batch_size=16)
    if method == "saliency":
        return Saliency(model).attribute(inputs, target=targets, abs=True)
    side = window if window is not None else max(1, inputs.shape[-1] // 8)
    side = min(side, inputs.shape[-2], inputs.shape[-1])
    stride = max(1, side // 2)
    return Occlusion(model).attribute(
        inputs,
        sliding_window_shapes=(inputs.shape[1], side, side),
        strides=(inputs.shape[1], stride, stride),
        baselines=0.0,
        target=targets,
        perturbations_per_eval=32,
    )


def require_vit(model: nn.Module, name: str | None = None) -> Any:
    """The model as a `VisionTransformer`, or a ConfigError naming the method and the model (option `name`)."""
    from vitexp.models import VisionTransformer

    if not isinstance(model, VisionTransformer):
        shown = f"model={name} ({type(model).__name__})" if name else type(model).__name__
        raise ConfigError(
            f"{PREFIX}method=attention_rollout needs a Vision Transformer (vitexp.models.VisionTransformer: "
            f"model=vit, vit_tiny or vit_small), but the model is {shown}: use integrated_gradients, saliency "
            "or occlusion"
        )
    return model


@torch.no_grad()
def attention_maps(model: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    """Each block's attention softmax(QK^T / sqrt(d)), (N, heads, T, T), recomputed from its `qkv` output.

    A forward hook on `attn.qkv` sees exactly the projection `Attention.forward` splits into q, k and v, so
    the weights are the ones SDPA used (dropout aside: the model is in eval mode)."""
    vit = require_vit(model)
    maps: list[torch.Tensor] = []

    def record(heads: int) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def hook(module: nn.Module, args: Any, qkv: torch.Tensor) -> None:
            batch, tokens, width = qkv.shape
            q, k, _ = qkv.float().view(batch, tokens, 3, heads, width // 3 // heads).permute(2, 0, 3, 1, 4)
            maps.append((q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1))

        return hook

    handles = [block.attn.qkv.register_forward_hook(record(block.attn.heads)) for block in vit.blocks]
    try:
        vit(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return maps


def rollout_matrix(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020), (N, T, T): per block the heads' mean attention plus the
    identity (the residual path), rows renormalised to sum to 1, multiplied from the first block up. Row i
    says how much of token i's representation at the top comes from each input token."""
    joint: torch.Tensor | None = None
    for attention in attention_maps(model, inputs):
        mixed = attention.mean(dim=1) + torch.eye(attention.shape[-1], device=attention.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        joint = mixed if joint is None else mixed @ joint
    assert joint is not None
    return joint


def attention_rollout(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """(N, H, W): the cls token's row of the rollout over the patch tokens, each patch's value on its pixels
    (nearest upsampling: a patch is the resolution the model attends at)."""
    joint = rollout_matrix(model, inputs)
    cls = joint[:, 0, 1:]
    side = math.isqrt(cls.shape[-1])
    grid = cls.reshape(-1, 1, side, side)
    return F.interpolate(grid, size=inputs.shape[-2:], mode="nearest")[:, 0]


# --- the figure -----------------------------------------------------------------------------------------
# Layout, in pixels: a header line, then rows of COLUMNS cells; a cell is a caption (true / predicted label)
# over two panels, the image and the image with its heatmap, each PANEL square; GAP between cells.
PANEL, CAPTION, HEADER, GAP, COLUMNS, DPI = 160, 36, 28, 12, 4, 100


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) of cells for `n` images."""
    columns = min(n, COLUMNS)
    return math.ceil(n / columns), columns


def grid_size(n: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG for `n` images."""
    rows, columns = grid_shape(n)
    return columns * 2 * PANEL + (columns - 1) * GAP, HEADER + rows * (CAPTION + PANEL) + (rows - 1) * GAP


def heat_scale(heat: torch.Tensor) -> torch.Tensor:
    """A map scaled to [0, 1] from its minimum to its 99th percentile (a few extreme pixels would wash out
    the rest; the minimum matters for rollout, whose every patch keeps some of the cls token's row)."""
    heat = heat.float() - heat.min()
    top = torch.quantile(heat.flatten(), 0.99)
    top = top if top > 0 else heat.max()
    return (heat / top).clamp(0, 1) if top > 0 else torch.zeros_like(heat)


@dataclass
class Panel:
    image: torch.Tensor  # (3, H, W) in [0, 1]
    heat: torch.Tensor  # (H, W) >= 0
    true: str
    pred: str
    confidence: float
    correct: bool


def render(panels: Sequence[Panel], title: str) -> bytes:
    """The grid as PNG bytes, exactly `grid_size(len(panels))` pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, height = grid_size(len(panels))
    _, columns = grid_shape(len(panels))
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.text(0.5, 1 - HEADER / 2 / height, title, ha="center", va="center", fontsize=9)
    for i, panel in enumerate(panels):
        row, column = divmod(i, columns)
        left = column * (2 * PANEL + GAP)
        top = HEADER + row * (CAPTION + PANEL + GAP)
        colour = "tab:green" if panel.correct else "tab:red"
        caption = f"true: {panel.true}\npred: {panel.pred} ({panel.confidence:.0%})"
        at = ((left + PANEL) / width, 1 - (top + CAPTION / 2) / height)
        fig.text(*at, caption, ha="center", va="center", fontsize=8, color=colour, linespacing=1.3)
        image = panel.image.permute(1, 2, 0).cpu().numpy()
        for j, overlay in enumerate((False, True)):
            box = [(left + j * PANEL) / width, 1 - (top + CAPTION + PANEL) / height, PANEL / width, PANEL / height]
            ax = fig.add_axes(box)
            ax.imshow(image, interpolation="nearest")
            if overlay:  # opaque where the attribution is high, the image showing through where it is low
                heat = heat_scale(panel.heat).cpu().numpy()
                colours = plt.get_cmap("inferno")(heat)
                colours[..., 3] = 0.15 + 0.75 * heat
                ax.imshow(colours, interpolation="nearest")
            ax.set_axis_off()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return buffer.getvalue()


# --- the command ----------------------------------------------------------------------------------------
def output_path(run_dir: Path, cfg: ExplainConfig) -> Path:
    """Where the PNG goes; an existing file there is refused unless `explain.overwrite=true`."""
    out = Path(cfg.out) if cfg.out is not None else run_dir / f"explain_{cfg.method}.png"
    if out.exists() and not cfg.overwrite:
        key = f"{PREFIX}out" if cfg.out is not None else "the default output"
        raise ConfigError(
            f"{out} exists ({key}): refusing to overwrite it; set {PREFIX}out=FILE or {PREFIX}overwrite=true"
        )
    if out.exists() and not out.is_file():
        raise ConfigError(f"{PREFIX}out={str(out)!r} is not allowed: expected a file name, not a directory")
    return out


def explain(argv: Sequence[str]) -> Path:
    """Run the command: check everything, load the run, attribute, draw and write the PNG; returns its path."""
    run_dir, cfg = parse_args(argv)
    require_run_dir(run_dir)
    out = output_path(run_dir, cfg)
    try:
        device = select_device(cfg.device)
    except (ConfigError, RuntimeError) as err:  # a ConfigError names trainer.device, the key a run sets
        why = str(err).split(": ", 1)[-1] if isinstance(err, ConfigError) else "expected auto, cpu, cuda or cuda:N"
        raise ConfigError(f"{PREFIX}device={cfg.device!r} is not allowed: {why}") from None
    run = load_run(run_dir, cfg, device)
    if cfg.method == "attention_rollout":
        require_vit(run.model, run.model_name)
    dataset = run.split_data(cfg.split)
    wanted = class_ids(cfg.classes, run.class_names)
    chosen = select_images(labels_of(dataset), wanted, cfg.n)
    if not chosen:
        which = ", ".join(run.class_names[i] for i in wanted)
        raise ConfigError(f"the {cfg.split} split holds no image of {PREFIX}classes={cfg.classes} ({which})")
    if len(chosen) < cfg.n:
        log.warning("the %s split holds only %d such images; drawing those", cfg.split, len(chosen))
    items = [dataset[i] for i in chosen]
    raw = torch.stack([torch.as_tensor(image) for image, _ in items]).to(device)
    labels = torch.tensor([int(label) for _, label in items], device=device)
    inputs = normalize(center_crop(raw, run.data.img_size), run.data.mean, run.data.std)
    with torch.no_grad():
        probs = run.model(inputs).float().softmax(dim=-1)
    confidence, predicted = probs.max(dim=-1)
    targets = predicted if cfg.target == "pred" else labels
    heat = attribute(run.model, inputs, targets, cfg.method, cfg.steps, cfg.window)
    images = unnormalize(inputs, run.data.mean, run.data.std)
    panels = [
        Panel(images[i], heat[i], run.class_names[y], run.class_names[p], float(c), y == p)
        for i, (y, p, c) in enumerate(zip(labels.tolist(), predicted.tolist(), confidence.tolist(), strict=True))
    ]
    explained = "the predicted class" if cfg.target == "pred" else "the true class"
    title = f"{cfg.method} ({run.model_name}, {cfg.split} split): attribution to {explained}, scaled per image"
    write_output(out, render(panels, title), cfg.overwrite)
    right = sum(panel.correct for panel in panels)
    log.info("wrote %s: %d %s images (%d predicted right), %s", out, len(panels), cfg.split, right, cfg.method)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: a bad argument or a directory that is no run exits 2 with one `error:` line; a run
    that cannot be read (an unreadable checkpoint, a missing dataset) exits 1, as train.py does."""
    run_tool(explain, __doc__, argv)


if __name__ == "__main__":
    main()
