"""The ways in: `python train.py --help` and completion (fast, without torch), the console scripts of an installed
package, and paths that do not depend on the working directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, TINY

GROUPS_WITH_DEFAULT = ["aug", "data", "debug", "hparams_search", "logger", "model", "optim", "probe", "sched"]


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`args` as a user's shell would run them, with `env` and none of the user's VITEXP_* paths."""
    base = {key: value for key, value in os.environ.items() if not key.startswith("VITEXP_")}
    return subprocess.run(args, cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=300)


def test_help_lists_every_group_and_option_and_never_imports_torch(tmp_path: Path) -> None:
    probe = (
        "import runpy, sys\n"
        f"sys.argv, sys.path[0] = ['train.py', '--help'], {str(REPO)!r}  # as `python train.py` sets them\n"
        f"try: runpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')\n"
        "finally: print('torch imported:', 'torch' in sys.modules)\n"
    )
    done = run([sys.executable, "-c", probe], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.rstrip().endswith("torch imported: False")
    assert "schema/" not in text  # Hydra's default help lists the internal schema/* groups
    sections: dict[str, set[str]] = {}
    for line in text.split("== Groups")[1].split("== Keys")[0].splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            header = line.split()[0]
            sections[header] = set()
        elif line.startswith("      "):
            sections[header].add(line.split()[0])
    expected = {
        f"{'' if path.name in GROUPS_WITH_DEFAULT else '+'}{path.name}=...": {
            option.stem for option in path.glob("*.yaml")
        }
        for path in (REPO / "conf").iterdir()
        if path.is_dir() and path.name != "hydra"
    }
    expected["hydra/launcher=..."] = {"slurm", "submitit_local"}
    assert sections == expected
    assert "+sweep=...\n      aug_smoothing    Augmentation x label smoothing: 4 x 4 = 16 jobs\n" in text
    assert "model=... (default: vit)\n" in text and "      slurm            SLURM" in text
    assert f"one run in {REPO}/outputs/<date>/<time>" in text and "-sc install=bash" in text
    assert text.count("python train.py ") >= 5  # the examples


def test_shell_completion_offers_options_and_keys(tmp_path: Path) -> None:
    def complete(line: str) -> list[str]:
        done = run([sys.executable, str(REPO / "train.py"), "-sc", "query=bash"], tmp_path, {"COMP_LINE": line})
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("python train.py model=") == [f"model={p.stem}" for p in sorted((REPO / "conf/model").glob("*"))]
    assert complete("python train.py debug=") == ["debug=fast", "debug=overfit"]
    assert complete("python train.py trainer.ep") == ["trainer.epochs="]
    after_options = complete("python train.py data=digits data.batch_size=8 model.depth=2 trainer.ep")
    assert after_options == ["trainer.epochs="]  # options whose schema references a package, and their keys


def test_help_takes_the_rest_of_a_command_line(tmp_path: Path) -> None:
    """`--help` appended to a command: its options and keys do not stop the help."""
    args = ["--help", "data=digits", "data.batch_size=8", "+experiment=pets_lab", "trainer.epochs=3"]
    done = run([sys.executable, str(REPO / "train.py"), *args], tmp_path)
    assert done.returncode == 0 and "== Groups" in done.stdout, done.stderr


def test_data_and_outputs_follow_the_environment_not_the_working_directory(tmp_path: Path) -> None:
    env = {"VITEXP_OUTPUTS": str(tmp_path / "out"), "VITEXP_DATA": str(tmp_path / "datasets")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run([sys.executable, str(REPO / "train.py"), *TINY, "data=digits", "debug=fast"], elsewhere, env)
    assert done.returncode == 0, done.stderr
    (results,) = (tmp_path / "out" / "outputs" / "debug").glob("*/*/results.json")
    assert json.loads(results.read_text())["config"]["data"]["root"] == str(tmp_path / "datasets")
    assert list(elsewhere.iterdir()) == []  # nothing where the command was started


def test_defaults_without_the_environment_are_the_checkouts(tmp_path: Path) -> None:
    train = [sys.executable, str(REPO / "train.py")]
    assert f"dir: {REPO}/outputs/" in run([*train, "--cfg", "hydra", "--resolve"], tmp_path).stdout
    assert f"root: {REPO}/data\n" in run([*train, "--cfg", "job", "data=cifar10"], tmp_path).stdout


def test_the_console_scripts_run_from_any_directory(tmp_path: Path) -> None:
    """`pip install -e .` (requirements.txt does it): vitexp-train reads the checkout's conf/ wherever it starts."""
    script = shutil.which("vitexp-train")
    assert script is not None, "vitexp-train is not installed: pip install -r requirements.txt (or pip install -e .)"
    done = run([script, "--cfg", "job", "data=cifar10", "aug=cutmix"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "name: cutmix" in done.stdout and f"root: {REPO}/data" in done.stdout  # vitexp-evaluate: test_evaluate


def test_a_built_wheel_carries_its_config_and_launchers(tmp_path: Path) -> None:
    """A non-editable install (`pip install .`): conf/ and sweeps/ inside the package, data and outputs in ~/vitexp."""
    source = tmp_path / "source"
    top_level = {".git", ".venv", "outputs", "multirun", "data", "build", "wandb", "vitexp.egg-info"}

    def ignored(directory: str, names: list[str]) -> set[str]:  # a checkout's own files, not what it made
        return {name for name in names if name == "__pycache__" or (Path(directory) == REPO and name in top_level)}

    shutil.copytree(REPO, source, ignore=ignored, symlinks=True)
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site)]
    done = run([*pip, str(source)], tmp_path)
    assert done.returncode == 0, done.stderr
    env = {"PYTHONPATH": str(site), "HOME": str(tmp_path / "home")}
    train = str(site / "bin" / "vitexp-train")
    done = run([train, "--cfg", "job", "+sweep=aug_smoothing", "data=cifar10"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert f"root: {tmp_path}/home/vitexp/data" in done.stdout
    done = run([train, "--cfg", "hydra", "--resolve", "hydra/launcher=submitit_local"], tmp_path, env)
    assert "_target_: hydra_plugins.vitexp_launcher.LocalLauncher" in done.stdout
    assert f"dir: {tmp_path}/home/vitexp/outputs/" in done.stdout
    where = run([sys.executable, "-c", "import vitexp; print(vitexp.__file__)"], tmp_path, env).stdout
    assert where.startswith(str(site))  # the installed copy, not the checkout
