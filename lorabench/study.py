"""A study config (``config/*.yaml``) expanded into runs, checked before any job starts.

Every task x variant x setting x seed is one run, except where a setting names the tasks or
variants it applies to. A run's overrides are layered: ``hparams.all`` < ``hparams.task.<task>``
< ``hparams.variant.<variant>`` < each ``hparams.where`` entry whose ``tasks`` and ``variants``
include the run (say, extraction for ``full`` on two tasks only) < the setting's ``hparams``. Each run's hyper-parameters are
resolved here, when Snakemake reads the Snakefile, so a wrong key or value fails the whole
DAG at once, naming the config entry, instead of failing one job an hour in.

A study's ``rates`` (a tuned-rates file, ``lorabench.rates``) sets each task x variant's ``lr``
over ``hparams.variant``, below ``where`` entries and settings; a run at its tuned rate passes
the file to ``lorabench.run --rates``, so that its record keeps the grid and scores the rate
was chosen on. A study's ``lr_sweep`` adds, for each swept task x variant x setting, one sweep run per rate
of the variant's grid and sweep seed (records under ``sweeps/``, scored on the validation
split carved from train), and makes the setting's final runs take their rate from the
sweep's selection file (``lorabench.sweep``).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

import yaml

import tasks
import variants
from lorabench import rates as rates_file
from lorabench.run import ConfigError, resolve_hparams
from tasks import files


RUNS = "runs"  # the folder of the study's runs, which analysis reads
SWEEPS = "sweeps"  # the folder of learning-rate sweep runs and their selection files
# What a sweep run changes from its setting's final run: it scores the validation split only,
# and keeps nothing it does not need to (no adapter, no extraction, no forgetting score).
SWEEP_OVERRIDES = {"score_split": "val", "save_adapter": False, "extract": None, "forgetting_tokens": 0}
# What decides the examples a run trains and is validated on: a sweep takes its final runs'.
SAME_DATA = ("val_size", "val_min_words", "train_size", "data_seed", "data_dir", "data_source")


@dataclass(frozen=True)
class Run:
    task: str
    variant: str
    setting: str
    seed: int
    overrides: tuple[tuple[str, Any], ...]
    folder: str = RUNS
    selection: str | None = None  # a swept setting's final run: the setting's sweep (its selection file)
    rates: str | None = None  # a run at its tuned rate: the rates file that holds it

    @property
    def key(self) -> tuple[str, str, str, str, int]:
        return (self.folder, self.task, self.variant, self.setting, self.seed)

    def record(self, results: str) -> str:
        return f"{results}/{self.folder}/{self.task}/{self.variant}/{self.setting}/seed{self.seed}.json"

    def inputs(self, results: str) -> dict[str, str]:
        """What the training job needs before it starts: the selection file of a swept setting."""
        return {"selection": f"{results}/{self.selection}"} if self.selection else {}

    @property
    def priority(self) -> int:
        """Snakemake's priority of the run's job: runs with extraction (a full fine-tune plus its
        SVDs and the scoring of the extracted adapters, the study's longest jobs) start first, so
        that the job slots end together instead of one of them alone on a long run."""
        return int(bool(dict(self.overrides).get("extract")))

    def cli_sets(self) -> str:
        """``key=value`` words for ``lorabench.run --set``, each shell-quoted."""
        return " ".join(shlex.quote(f"{key}={_yaml_scalar(value)}") for key, value in self.overrides)

    def cli_task(self) -> str:
        """``--task-spec JSON`` for a task the study's config declares (``datasets``), else nothing."""
        declared = tasks.get(self.task).declared
        return f"--task-spec {shlex.quote(json.dumps(declared, sort_keys=True))}" if declared is not None else ""

    def cli_rates(self) -> str:
        """``--rates FILE`` for a run at its tuned rate, else nothing."""
        return f"--rates {shlex.quote(self.rates)}" if self.rates else ""


@dataclass(frozen=True)
class Sweep:
    """One task x variant x setting whose learning rate is chosen from a grid."""

    task: str
    variant: str
    setting: str
    runs: tuple[Run, ...]

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.task, self.variant, self.setting)

    @property
    def selection(self) -> str:
        """The selection file, relative to the results folder."""
        return selection_path(self.task, self.variant, self.setting)

    def records(self, results: str) -> list[str]:
        return [run.record(results) for run in self.runs]


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _applies(entry: dict[str, Any], task: str, variant: str) -> bool:
    return task in entry.get("tasks", [task]) and variant in entry.get("variants", [variant])


def _check_names(names: list[str], kind: str, where: str) -> None:
    registry = tasks.REGISTRY if kind == "tasks" else variants.REGISTRY
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise ConfigError(f"config {where}: unknown {kind} {unknown}; known {kind}: {', '.join(registry)}")


def declare_datasets(config: dict[str, Any]) -> None:
    """Register the tasks the study declares from files (``datasets``, tasks/files.py)."""
    for name, spec in (config.get("datasets") or {}).items():
        try:
            files.declare(name, spec, "config 'datasets'")
        except (files.DeclarationError, tasks.DataError) as error:
            raise ConfigError(str(error)) from error


def resolved(config: dict[str, Any]) -> dict[str, Any]:
    """The study with ``variants: all`` spelt out: every discovered variant but those in
    ``exclude_variants``, so that a new variant file joins every such study with no edit;
    its declared data sets registered as tasks."""
    declare_datasets(config)
    if config["variants"] != "all":
        return config
    excluded = config.get("exclude_variants", [])
    _check_names(excluded, "variants", "'exclude_variants'")
    return {**config, "variants": [name for name in variants.REGISTRY if name not in excluded]}


def expand(config: dict[str, Any]) -> list[Run]:
    """All runs of a study, in a stable order, each with its hyper-parameters checked; a swept
    setting's final runs name their sweep, whose runs come from :func:`expand_sweeps`."""
    config = resolved(config)
    _check_config_names(config)
    rates = tuned_rates(config)
    runs = []
    for setting, task, variant, overrides in _combinations(config, rates):
        selection = selection_path(task, variant, setting) if _swept(config, setting, task, variant) else None
        tuned = config["rates"] if selection is None and _at_tuned_rate(config, rates, setting, task, variant) else None
        for seed in seeds_of(config, setting, task):
            runs.append(Run(task, variant, setting, seed, tuple(overrides.items()), selection=selection, rates=tuned))
    return runs


def seeds_of(config: dict[str, Any], setting: str, task: str) -> list[int]:
    """The seeds a setting's runs on a task train with: the setting's own ``seeds``, else the
    task's in ``task_seeds``, else the study's ``seeds``."""
    own = config["settings"][setting].get("seeds")
    return own if own is not None else config.get("task_seeds", {}).get(task, config["seeds"])


def tuned_rates(config: dict[str, Any]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """setting -> task -> variant -> entry of the study's rates file; empty when it names none."""
    return rates_file.read(config["rates"]) if config.get("rates") else {}


def _at_tuned_rate(config: dict[str, Any], rates: dict, setting: str, task: str, variant: str) -> bool:
    """Whether the run's lr is its tuned rate: the file has one and no later layer sets lr."""
    if rates_file.lookup(rates, setting, task, variant) is None:
        return False
    hparams = config.get("hparams", {})
    later = [entry["hparams"] for entry in hparams.get("where", []) if _applies(entry, task, variant)]
    return not any("lr" in layer for layer in [*later, config["settings"][setting].get("hparams", {})])


def selection_path(task: str, variant: str, setting: str) -> str:
    """A swept setting's selection file, relative to the results folder."""
    return f"{SWEEPS}/{task}/{variant}/{setting}/selected.json"


def _swept(config: dict[str, Any], setting: str, task: str, variant: str) -> bool:
    spec = config.get("lr_sweep")
    return bool(spec) and setting in spec.get("settings", ["default"]) and _applies(spec, task, variant)


def expand_sweeps(config: dict[str, Any]) -> list[Sweep]:
    """The learning-rate sweeps of a study (``lr_sweep``): per swept task x variant x setting,
    one run per rate of the variant's grid and sweep seed, each checked like any run."""
    spec = config.get("lr_sweep")
    if not spec:
        return []
    config = resolved(config)
    _check_config_names(config)
    grids = spec["grids"]
    both = sorted(set(grids) & set(config["settings"]) & set(variants.REGISTRY))
    if both:
        raise ConfigError(f"config 'lr_sweep.grids': {both} name both a setting and a variant; rename the setting")
    _check_names([name for name in grids if name != "all" and name not in config["settings"]], "variants", "'lr_sweep.grids'")
    for kind in ("tasks", "variants"):
        _check_names(spec.get(kind, []), kind, f"'lr_sweep.{kind}'")
    unknown = sorted(set(spec.get("settings", ["default"])) - set(config["settings"]))
    if unknown:
        raise ConfigError(f"config 'lr_sweep.settings': unknown settings {unknown}; settings of this study: {', '.join(config['settings'])}")
    changes_data = sorted(set(spec.get("hparams", {})) & set(SAME_DATA))
    if changes_data:
        raise ConfigError(f"config 'lr_sweep.hparams' sets {changes_data}: the sweep must see the data its final runs train on; "
                          "set them in the study's hparams instead")
    sweeps = []
    for setting, task, variant, overrides in _combinations(config):
        if not _swept(config, setting, task, variant):
            continue
        grid = grids.get(setting if setting != "default" else variant, grids.get(variant, grids.get("all")))
        if grid is None:
            raise ConfigError(f"config 'lr_sweep.grids' has no grid for variant {variant!r}: add 'all' or {variant!r}")
        where = f"config 'lr_sweep', setting {setting!r}, task {task!r}, variant {variant!r}"
        hparams = _resolve(where, task, variant, {**overrides, **spec.get("hparams", {})})
        if isinstance(grid, dict):  # factors of the rate the run is configured with
            grid = [float(f"{factor * hparams['lr']:.2g}") for factor in grid["factors"]]
        if hparams["max_steps"] == 0 and hparams["epochs"] == 0:
            raise ConfigError(f"{where}: the setting trains no step (max_steps=0); leave it out of lr_sweep.settings")
        if hparams["val_size"] == 0 and not tasks.get(task).has_validation:
            raise ConfigError(f"{where}: val_size=0, and a sweep selects on a validation split carved from train; "
                              "set val_size in the study's hparams (all or task), so that its final runs train on the same examples")
        if "max_steps" in spec.get("hparams", {}) and hparams["epochs"] > 0:
            raise ConfigError(f"{where}: lr_sweep.hparams sets max_steps, but epochs={hparams['epochs']:g} sets the steps; "
                              "set epochs in lr_sweep.hparams (or epochs: 0 with max_steps)")
        base = {**overrides, **spec.get("hparams", {}), **SWEEP_OVERRIDES}
        names = [f"{setting}.lr{lr:g}" for lr in grid]
        if len(set(names)) < len(names):
            raise ConfigError(f"config 'lr_sweep.grids' for {variant!r}: rates {grid} are not distinct in 6 significant digits")
        runs = []
        for lr, name in zip(grid, names):
            _resolve(where, task, variant, {**base, "lr": lr})
            for seed in spec.get("seeds", config["seeds"][:1]):
                runs.append(Run(task, variant, name, seed, tuple({**base, "lr": lr}.items()), folder=SWEEPS))
        sweeps.append(Sweep(task, variant, setting, tuple(runs)))
    if not sweeps:
        raise ConfigError("config 'lr_sweep' sweeps no run: its tasks, variants and settings match none of the study's")
    return sweeps


def _check_config_names(config: dict[str, Any]) -> None:
    hparams = config.get("hparams", {})
    for kind in ("tasks", "variants"):
        _check_names(config[kind], kind, f"'{kind}'")
        for number, entry in enumerate(hparams.get("where", []), start=1):
            _check_names(entry.get(kind, []), kind, f"'hparams.where' entry {number}")
        for setting, spec in config["settings"].items():
            _check_names(spec.get(kind, []), kind, f"setting {setting!r}")
    _check_names(list(config.get("task_seeds", {})), "tasks", "'task_seeds'")


def _combinations(config: dict[str, Any], tuned: dict[str, dict[str, dict[str, dict[str, Any]]]] | None = None):
    """(setting, task, variant, overrides) of every run but its seed, overrides checked; ``tuned``
    (``tuned_rates``) sets lr over the variant's layer."""
    hparams = config.get("hparams", {})
    tuned = tuned or {}
    for setting, spec in config["settings"].items():
        for task in spec.get("tasks", config["tasks"]):
            for variant in spec.get("variants", config["variants"]):
                overrides = {
                    **({"data_dir": config["data_dir"]} if config.get("data_dir") else {}),
                    **hparams.get("all", {}),
                    **hparams.get("task", {}).get(task, {}),
                    **hparams.get("variant", {}).get(variant, {}),
                    **({"lr": entry["lr"]} if (entry := rates_file.lookup(tuned, setting, task, variant)) else {}),
                    **{key: value for entry in hparams.get("where", []) if _applies(entry, task, variant) for key, value in entry["hparams"].items()},
                    **spec.get("hparams", {}),
                }
                _resolve(f"config setting {setting!r}, task {task!r}, variant {variant!r}", task, variant, overrides)
                yield setting, task, variant, overrides


def _resolve(where: str, task: str, variant: str, overrides: dict[str, Any]) -> dict[str, Any]:
    try:
        return resolve_hparams(task, variant, overrides)
    except (ConfigError, KeyError) as error:
        raise ConfigError(f"{where}: {error}") from error
