"""The report of an Optuna search, from its sweep directory: its trials sorted by the objective with their parameters
and test metrics (report.md, trials.csv), the optimisation history and the parameters' importances (PNG + PDF,
drawn with matplotlib: no browser needed), and the command line that reruns the best trial on its own.

The study (`optuna.db`) says which trials exist, their state and objective; each trial's directory (its job
number is its trial number) adds what the study does not hold: test metrics and the overrides it ran with.
"""

from __future__ import annotations

import csv
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from vitexp.config import SearchConfig
from vitexp.jobs import Job, job_state, recorded_overrides
from vitexp.logger import RESULTS_FILE, write_json
from vitexp.report_plots import _pyplot, save

if TYPE_CHECKING:  # optuna takes seconds to import: only a search's report loads it
    import optuna
    from optuna.trial import FrozenTrial

STUDY_FILE = "optuna.db"
TEST_METRICS = (("acc", "test acc (%)", 100), ("f1", "macro F1", 1), ("ece", "ECE", 1))
# Overrides that made the trial part of a search, not what it computed: the rerun command leaves them out.
SEARCH_OVERRIDES = ("hparams_search", "search", "hydra")


@dataclass
class Search:
    """A search's study and what its sweep directory says about each trial."""

    sweep_dir: Path
    study: optuna.Study
    metric: str
    direction: str

    @property
    def trials(self) -> list[FrozenTrial]:
        """Every trial: the finished ones best first, then the failed and the unfinished by number."""
        done = [t for t in self.study.trials if t.state.name == "COMPLETE"]
        done.sort(key=lambda t: t.value, reverse=self.direction == "maximize")
        return done + [t for t in self.study.trials if t.state.name != "COMPLETE"]

    @property
    def params(self) -> list[str]:
        return list(dict.fromkeys(name for trial in self.study.trials for name in trial.params))

    def job(self, trial: FrozenTrial) -> Job:
        return Job(trial.number, [], self.sweep_dir / str(trial.number))

    def results(self, trial: FrozenTrial) -> dict[str, Any]:
        path = self.sweep_dir / str(trial.number) / RESULTS_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def state(self, trial: FrozenTrial) -> str:
        """The study's word for the trial; RUNNING ones by their directory (a relaunch resumes them)."""
        if trial.state.name != "RUNNING":
            return trial.state.name.lower()
        return {"running": "running", "new": "not started"}.get(job_state(self.job(trial)), "to resume")


def load(sweep_dir: Path) -> Search | None:
    """The search run in `sweep_dir`, or None for a sweep that is not one."""
    if not (sweep_dir / STUDY_FILE).exists():
        return None
    import optuna

    storage = f"sqlite:///{sweep_dir / STUDY_FILE}"
    study_name = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.sweeper.study_name
    study = optuna.load_study(study_name=study_name, storage=storage)
    return Search(sweep_dir, study, *study_objective(study))


def study_objective(study: optuna.Study) -> tuple[str, str]:
    """(metric, direction) of a study: the metric as `vitexp.search` recorded it when the study began."""
    return study.user_attrs.get("metric", SearchConfig.metric), study.direction.name.lower()


def rerun_command(job_overrides: list[str]) -> str:
    """`python train.py` with the trial's overrides, less those that made it a search job."""
    kept = [
        o for o in job_overrides if o.lstrip("+~").partition("=")[0].split(".")[0].split("/")[0] not in SEARCH_OVERRIDES
    ]
    return shlex.join(["python", "train.py", *kept])


def show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def rows(search: Search) -> list[dict[str, Any]]:
    """trials.csv: one row per trial, in the report's order."""
    out = []
    for trial in search.trials:
        results = search.results(trial)
        row: dict[str, Any] = {"trial": trial.number, "state": search.state(trial), search.metric: trial.value}
        row |= {name: trial.params.get(name) for name in search.params}
        row |= {f"test_{key}": results.get("test", {}).get(key) for key, _, _ in TEST_METRICS}
        row["run_dir"] = str(search.sweep_dir / str(trial.number))
        out.append(row)
    return out


def markdown(search: Search, plots: list[Path]) -> list[str]:
    counts = {state: sum(search.state(t) == state for t in search.study.trials) for state in ("complete", "fail")}
    unfinished = len(search.study.trials) - sum(counts.values())
    lines = [
        f"## Optuna search: study `{search.study.study_name}`, {search.metric} to {search.direction}",
        "",
        f"{len(search.study.trials)} trials: {counts['complete']} complete, {counts['fail']} failed"
        + (f", {unfinished} unfinished (a relaunch of the sweep resumes them)" if unfinished else "")
        + f". The objective is each trial's best {search.metric} over its validation epochs; the test metrics "
        "judge the trials, they choose nothing.",
        "",
    ]
    if counts["complete"]:
        best = search.study.best_trial
        test = search.results(best).get("test", {})
        lines += [
            f"**Best trial: #{best.number}**, {search.metric} {best.value:.4f}"
            + (f", test acc {100 * test['acc']:.2f}%" if "acc" in test else "")
            + ", with "
            + ", ".join(f"{name}={show(value)}" for name, value in best.params.items()),
            "",
            "Rerun it on its own:",
            "",
            f"    {rerun_command(recorded_overrides(search.sweep_dir / str(best.number)) or [])}",
            "",
        ]
    names = ["trial", search.metric, *search.params, *(label for _, label, _ in TEST_METRICS), "state"]
    lines += ["| " + " | ".join(names) + " |", "|---" * len(names) + "|"]
    for trial in search.trials:
        test = search.results(trial).get("test", {})
        values = [
            str(trial.number),
            "—" if trial.value is None else f"{trial.value:.4f}",
            *(show(trial.params[name]) if name in trial.params else "—" for name in search.params),
            *(
                "—" if key not in test else f"{scale * test[key]:.{2 if scale == 100 else 4}f}"
                for key, _, scale in TEST_METRICS
            ),
            search.state(trial),
        ]
        lines.append("| " + " | ".join(values) + " |")
    lines += ["", *(f"![{plot.stem.replace('_', ' ')}]({plot.name})" for plot in plots), ""]
    return lines


def history_figure(search: Search) -> Any:
    """Each finished trial's objective by trial number, and the best so far: how the search converged."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    done = sorted((t for t in search.study.trials if t.state.name == "COMPLETE"), key=lambda t: t.number)
    numbers, values = [t.number for t in done], [t.value for t in done]
    pick = max if search.direction == "maximize" else min
    best = [pick(values[: i + 1]) for i in range(len(values))]
    ax.plot(numbers, values, "o", label="trial")
    ax.step(numbers, best, where="post", color="C3", label="best so far")
    failed = [t.number for t in search.study.trials if t.state.name == "FAIL"]
    if failed and values:
        ax.plot(failed, [min(values)] * len(failed), "x", color="grey", label="failed (not a value)")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{search.metric} (best over epochs)")
    ax.set_title(f"optimisation history: {search.study.study_name}")
    ax.legend()
    return fig


def importances(search: Search) -> dict[str, float]:
    """Each parameter's importance to the objective: the mean decrease in impurity of a random forest fitted to the
    finished trials (seeded). Not fANOVA, Optuna's default: optuna 2.10's fails under numpy 2. Empty while fewer
    than two trials finished."""
    import optuna

    try:
        evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)
        return dict(optuna.importance.get_param_importances(search.study, evaluator=evaluator))
    except (ValueError, RuntimeError):  # fewer than two finished trials
        return {}


def importances_figure(found: dict[str, float]) -> Any:
    plt = _pyplot()
    names = list(found)[::-1]  # the most important on top
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
    ax.barh(names, [found[name] for name in names])
    ax.set_xlabel("importance (random forest's mean decrease in impurity; they sum to 1)")
    ax.set_title("parameter importances")
    return fig


def write(sweep_dir: Path) -> tuple[list[str], list[Path]]:
    """The search's section of report.md and its plots (with trials.csv and the figures written); nothing for a
    sweep that is not a search."""
    search = load(sweep_dir)
    if search is None:
        return [], []
    plots = []
    if any(t.state.name == "COMPLETE" for t in search.study.trials):
        plots.append(save(history_figure(search), sweep_dir, "search_history"))
    if found := importances(search):
        plots.append(save(importances_figure(found), sweep_dir, "search_importances"))
        write_json(sweep_dir / "search_importances.json", found)
    table = rows(search)
    with (sweep_dir / "trials.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(table[0]) if table else ["trial"])
        writer.writeheader()
        writer.writerows(table)
    return markdown(search, plots), plots
