"""Learning-rate selection: each variant's best rate from a grid, chosen on a validation split
carved out of train, never on the split scores are reported on.

Published comparisons of LoRA variants are mostly learning-rate artefacts: with tuned rates,
LoRA, PiSSA, DoRA and others land within about half a point of each other. A study's
``lr_sweep`` (``config/schema.yaml``, expanded by ``lorabench.study``) trains every rate of a
grid with ``score_split=val``, so that those records hold the validation score only; this
module picks the rate with the best mean over the sweep's seeds, and the final runs, over
all seeds, train at that rate (``python -m lorabench.run --selection FILE``).

    python -m lorabench.sweep --out selected.json SWEEP_RECORD [SWEEP_RECORD ...]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from lorabench import files, records

VALIDATION_SPLIT = "validation"  # the record's eval split when score_split=val
RULE = ("highest mean validation score over the sweep's seeds; a rate with a failed run (or a score that is not a number) "
        "is not chosen; ties go to the smaller rate")


class SelectionError(ValueError):
    """Sweep records that cannot be compared, or a selection file that cannot be used."""


def select(sweep_records: list[dict[str, Any]], sources: list[str]) -> dict[str, Any]:
    """The selection file's content: every rate's validation scores, and the chosen one."""
    if not sweep_records:
        raise SelectionError("no sweep records to select from")
    groups = {(r["run"]["task"], r["run"]["variant"]) for r in sweep_records}
    if len(groups) > 1:
        raise SelectionError(f"sweep records of several task/variant pairs {sorted(groups)}; select within one")
    by_rate: dict[float, list[tuple[dict, str]]] = {}
    for record, source in zip(sweep_records, sources):
        if record["status"] == "ok" and record["eval"]["split"] != VALIDATION_SPLIT:
            raise SelectionError(f"{source}: scored on the {record['eval']['split']!r} split; a sweep selects on "
                                 f"{VALIDATION_SPLIT!r} only (run it with --set score_split=val)")
        by_rate.setdefault(float(record["run"]["hparams"]["lr"]), []).append((record, source))
    metric = next((r["eval"]["primary"] for r in sweep_records if r["status"] == "ok"), None)
    if metric is None:
        raise SelectionError(f"every sweep run failed ({', '.join(sources)}): no learning rate of the grid trains; "
                             "widen the grid towards smaller rates")
    lower = metric in records.LOWER_IS_BETTER
    scores = []
    for rate in sorted(by_rate):
        # A failed run, or one whose score is not a number (a constant prediction's correlation), counts as failed.
        scored = [(r["eval"]["primary_value"] if r["status"] == "ok" else None, source) for r, source in by_rate[rate]]
        values = [value for value, _ in scored if _finite(value)]
        failed = [source for value, source in scored if not _finite(value)]
        mean = statistics.fmean(values) if values and not failed else math.nan
        scores.append({"lr": rate, "mean": mean, "values": values, "seeds": sorted(r["run"]["seed"] for r, _ in by_rate[rate]),
                       "failed": len(failed)})
    ranked = [entry for entry in scores if not math.isnan(entry["mean"])]
    if not ranked:
        raise SelectionError(f"every learning rate of the grid has a failed run ({', '.join(sources)}); widen the grid")
    best = min(ranked, key=lambda entry: (entry["mean"] if lower else -entry["mean"], entry["lr"]))
    task, variant = next(iter(groups))
    return {
        "task": task,
        "variant": variant,
        "hparam": "lr",
        "grid": [entry["lr"] for entry in scores],
        "metric": metric,
        "split": VALIDATION_SPLIT,
        "lower_is_better": lower,
        "rule": RULE,
        "scores": [{**entry, "mean": None if math.isnan(entry["mean"]) else entry["mean"]} for entry in scores],
        "chosen": best["lr"],
        "hparams": {"lr": best["lr"]},
        "sources": sources,
    }


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def read_selection(path: str | Path) -> dict[str, Any]:
    """A selection file written by :func:`main`, checked enough to apply it."""
    path = Path(path)
    try:
        selection = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise SelectionError(f"{path}: no such selection file; run its sweep first (snakemake builds it)") from error
    except json.JSONDecodeError as error:
        raise SelectionError(f"{path}: not valid JSON ({error}); delete it and rerun its sweep's select_lr job") from error
    if not isinstance(selection, dict) or not isinstance(selection.get("hparams"), dict) or not selection["hparams"]:
        raise SelectionError(f"{path}: field 'hparams' is missing or empty; delete it and rerun its sweep's select_lr job")
    return selection


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorabench.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="the selection file to write (JSON)")
    parser.add_argument("records", nargs="+", help="the sweep's run records (one per rate and seed)")
    args = parser.parse_args(argv)
    try:
        selection = select([records.read(path) for path in args.records], list(args.records))
    except (SelectionError, ValueError) as error:
        print(f"lorabench.sweep: error: {error}", file=sys.stderr)
        return 2
    files.write_text_atomic(args.out, json.dumps(selection, indent=1) + "\n")
    table = ", ".join(f"{entry['lr']:g}: {entry['mean']}" for entry in selection["scores"])
    print(f"{selection['task']}/{selection['variant']}: lr {selection['chosen']:g} (validation {selection['metric']}: {table}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
