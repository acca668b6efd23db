"""Tuned learning rates: the file a study reads (``config/rates.yaml``), written from a tuning
study's sweeps by one command, with its provenance.

    python -m lorabench.rates results/tune --config config/tune.yaml --out config/rates.yaml

A tuning study (``config/tune.yaml``, ``make tune``) is an ``lr_sweep`` over every task x variant
at the default study's budgets; each sweep's selection file (``lorabench.sweep``) holds every
rate's validation score and the chosen rate. This module gathers them into one readable file:
per task and variant, the chosen rate, the grid with each rate's validation scores, whether the
choice lies at an edge of the grid (where the best rate may lie outside it), the budget it was
tuned at, and the commit of the code that ran the sweep. A study that names the file
(``rates:``) trains each task x variant at its tuned rate, unless a setting or a ``where``
entry sets ``lr`` itself. A setting the tuning study sweeps too (LoRA at rank 64) has its own
entries under ``settings``; every other setting trains at the default setting's rate; such a run's record carries the entry as its ``selection``, as a
swept run's does, so the report shows grid, scores and edge for both alike.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from lorabench import files, records, sweep

FORMAT = "lorabench-rates/1"
# What decides the rate's meaning: a rate tuned at other budgets or data is another rate. How often a
# run validates is not among them: validation draws no random number and changes no step.
BUDGET_KEYS = ("max_steps", "epochs", "batch_size", "grad_accum", "warmup_ratio", "max_length", "truncation", "train_size",
               "val_size", "val_min_words", "data_seed", "model")


class RatesError(ValueError):
    """A rates file that cannot be read or used; the message names the file, the field and the fix."""


def edge(selection: dict[str, Any]) -> str | None:
    """``low`` or ``high`` when the chosen rate is the grid's smallest or largest, else None."""
    grid = sorted(selection["grid"])
    if selection["chosen"] == grid[0]:
        return "low"
    if selection["chosen"] == grid[-1]:
        return "high"
    return None


def entry(selection: dict[str, Any], sweep_records: list[dict[str, Any]]) -> dict[str, Any]:
    """A rates-file entry: the sweep's selection, with the budget it ran at and the commits of
    the code that ran it (``+dirty``: with uncommitted changes)."""
    hparams = sweep_records[0]["run"]["hparams"]
    commits = {f"{meta.get('git_commit')}{'+dirty' if meta.get('git_dirty') else ''}" for meta in (r["meta"] for r in sweep_records)}
    return {
        "lr": selection["chosen"],
        "at_edge": edge(selection),
        **{key: value for key, value in selection.items() if key != "sources"},
        "budget": {key: hparams[key] for key in BUDGET_KEYS if key in hparams},
        "commits": sorted(commits),
    }


def collect(results: str | Path, config: dict[str, Any]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """setting -> task -> variant -> entry, for every sweep of ``config`` whose selection file
    exists under ``results`` (a tuning study may be run a task at a time)."""
    from lorabench import study  # here: study imports run, which imports this module

    results = Path(results)
    rates: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for swept in study.expand_sweeps(config):
        path = results / swept.selection
        if not path.is_file():
            continue
        selection = sweep.read_selection(path)
        found = [records.read(record) for record in swept.records(str(results)) if Path(record).is_file()]
        if not found:
            raise RatesError(f"{path}: none of its sweep's records is there to tell the budget and commit; rerun the sweep")
        rates.setdefault(swept.setting, {}).setdefault(swept.task, {})[swept.variant] = entry(selection, found)
    return rates


def render(rates: dict[str, dict[str, dict[str, dict[str, Any]]]], config_path: str, results: str) -> str:
    """The file's text: a header saying how to regenerate it, then one YAML document (the
    default setting's rates under ``rates``, a swept setting's own under ``settings``)."""
    header = (f"# Tuned learning rates: written by `python -m lorabench.rates {results} --config {config_path}` (make tune)\n"
              "# from the tuning study's sweep records; regenerate it rather than edit it. Per task and variant: the\n"
              "# chosen rate (lr), every rate's validation scores (scores), at_edge (low/high: the best rate may lie\n"
              "# outside the grid), the budget it was tuned at and the commits of the code that ran the sweep.\n"
              "# settings: the rates of a setting swept on its own (the others train at the default setting's).\n")
    others = {setting: by_task for setting, by_task in rates.items() if setting != "default"}
    document = {"format": FORMAT, "config": config_path, "rule": sweep.RULE, "rates": rates.get("default", {}),
                **({"settings": others} if others else {})}
    return header + yaml.safe_dump(document, sort_keys=False, width=120)


def read(path: str | Path) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """setting -> task -> variant -> entry from a rates file (``default``: its ``rates``),
    checked enough to use it."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError as error:
        raise RatesError(f"{path}: no such rates file; run `make tune`, or drop 'rates' from the study config") from error
    except yaml.YAMLError as error:
        raise RatesError(f"{path}: not valid YAML ({error}); regenerate it with `python -m lorabench.rates`") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT or not isinstance(document.get("rates"), dict) \
            or not isinstance(document.get("settings", {}), dict):
        raise RatesError(f"{path}: field 'format' is not {FORMAT!r}, or 'rates' is missing, or 'settings' is not a mapping; "
                         "regenerate it with `python -m lorabench.rates`")
    by_setting = {"default": document["rates"], **document.get("settings", {})}
    for setting, by_task in by_setting.items():
        field = "rates" if setting == "default" else f"settings.{setting}"
        for task, by_variant in (by_task or {}).items():
            for variant, found in by_variant.items():
                if not isinstance(found, dict) or not isinstance(found.get("lr"), (int, float)) or found.get("task") != task \
                        or found.get("variant") != variant:
                    raise RatesError(f"{path}: {field}.{task}.{variant} lacks a numeric 'lr' or names another task or variant; "
                                     "regenerate it with `python -m lorabench.rates`")
    return by_setting


def lookup(by_setting: dict[str, dict[str, dict[str, dict[str, Any]]]], setting: str, task: str, variant: str) -> dict[str, Any] | None:
    """The entry a setting's run of ``task``/``variant`` trains at: the setting's own where it
    was swept, else the default setting's; None where the file has neither."""
    for name in (setting, "default"):
        found = by_setting.get(name, {}).get(task, {}).get(variant)
        if found is not None:
            return found
    return None


def selection_for(path: str | Path, task: str, variant: str, setting: str = "default") -> dict[str, Any]:
    """The entry of ``task``/``variant`` in ``setting`` as a run's ``selection`` (``lorabench.run --rates``)."""
    found = lookup(read(path), setting, task, variant)
    if found is None:
        raise RatesError(f"{path}: no tuned rate for {task}/{variant}; run its sweep (make tune) or train it without --rates")
    return {**found, "source": str(path)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorabench.rates", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="the tuning study's results folder (its sweeps/ selections and records)")
    parser.add_argument("--config", default="config/tune.yaml", help="the tuning study's config (default: config/tune.yaml)")
    parser.add_argument("--out", default="config/rates.yaml", type=Path, help="the rates file to write (default: config/rates.yaml)")
    args = parser.parse_args(argv)
    try:
        rates = collect(args.results, yaml.safe_load(Path(args.config).read_text()))
    except (RatesError, sweep.SelectionError, ValueError) as error:  # a ConfigError is a ValueError
        print(f"lorabench.rates: error: {error}", file=sys.stderr)
        return 2
    if not rates:
        print(f"lorabench.rates: error: no selection file under {args.results}; run the tuning study first (make tune)", file=sys.stderr)
        return 2
    files.write_text_atomic(args.out, render(rates, args.config, args.results))
    for setting, by_task in rates.items():
        for task, by_variant in by_task.items():
            flagged = [f"{variant} ({found['at_edge']})" for variant, found in by_variant.items() if found["at_edge"]]
            named = task if setting == "default" else f"{task} ({setting})"
            print(f"{named}: {len(by_variant)} rates" + (f"; at the edge of the grid: {', '.join(flagged)}" if flagged else ""))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
