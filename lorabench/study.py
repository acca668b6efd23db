"""A study config (``config/*.yaml``) expanded into runs, checked before any job starts.

Every task x variant x setting x seed is one run, except where a setting names the tasks or
variants it applies to. A run's overrides are layered: ``hparams.all`` < ``hparams.task.<task>``
< ``hparams.variant.<variant>`` < each ``hparams.where`` entry whose ``tasks`` and ``variants``
include the run (say, extraction for ``full`` on two tasks only) < the setting's ``hparams``. Each run's hyper-parameters are
resolved here, when Snakemake reads the Snakefile, so a wrong key or value fails the whole
DAG at once, naming the config entry, instead of failing one job an hour in.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

import yaml

import tasks
import variants
from lorabench.run import ConfigError, resolve_hparams


@dataclass(frozen=True)
class Run:
    task: str
    variant: str
    setting: str
    seed: int
    overrides: tuple[tuple[str, Any], ...]

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.task, self.variant, self.setting, self.seed)

    def record(self, results: str) -> str:
        return f"{results}/runs/{self.task}/{self.variant}/{self.setting}/seed{self.seed}.json"

    def cli_sets(self) -> str:
        """``key=value`` words for ``lorabench.run --set``, each shell-quoted."""
        return " ".join(shlex.quote(f"{key}={_yaml_scalar(value)}") for key, value in self.overrides)


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _applies(entry: dict[str, Any], task: str, variant: str) -> bool:
    return task in entry.get("tasks", [task]) and variant in entry.get("variants", [variant])


def _check_names(names: list[str], kind: str, where: str) -> None:
    registry = tasks.REGISTRY if kind == "tasks" else variants.REGISTRY
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise ConfigError(f"config {where}: unknown {kind} {unknown}; known {kind}: {', '.join(registry)}")


def expand(config: dict[str, Any]) -> list[Run]:
    """All runs of a study, in a stable order, each with its hyper-parameters checked."""
    hparams = config.get("hparams", {})
    for kind in ("tasks", "variants"):
        _check_names(config[kind], kind, f"'{kind}'")
        for number, entry in enumerate(hparams.get("where", []), start=1):
            _check_names(entry.get(kind, []), kind, f"'hparams.where' entry {number}")
        for setting, spec in config["settings"].items():
            _check_names(spec.get(kind, []), kind, f"setting {setting!r}")
    runs = []
    for setting, spec in config["settings"].items():
        for task in spec.get("tasks", config["tasks"]):
            for variant in spec.get("variants", config["variants"]):
                overrides = {
                    **({"data_dir": config["data_dir"]} if config.get("data_dir") else {}),
                    **hparams.get("all", {}),
                    **hparams.get("task", {}).get(task, {}),
                    **hparams.get("variant", {}).get(variant, {}),
                    **{key: value for entry in hparams.get("where", []) if _applies(entry, task, variant) for key, value in entry["hparams"].items()},
                    **spec.get("hparams", {}),
                }
                try:
                    resolve_hparams(task, variant, overrides)
                except (ConfigError, KeyError) as error:
                    raise ConfigError(f"config setting {setting!r}, task {task!r}, variant {variant!r}: {error}") from error
                for seed in config["seeds"]:
                    runs.append(Run(task, variant, setting, seed, tuple(overrides.items())))
    return runs
