"""Atomic writes: a write interrupted midway (an error, Ctrl-C, a full disk) leaves the previous
file byte-identical, or no file where there was none, and no temporary file beside it."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

import variants
from analysis import aggregate, plots, report
from lorabench import adapters, checkpoint, files, measure, records
from tests.conftest import build_model, make_batch
from tests.test_analysis import FULL_PARAMS, LORA_PARAMS, write_run

pytestmark = pytest.mark.usefixtures("single_thread")

INTERRUPTIONS = {
    "full-disk": lambda path: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)),
    "ctrl-c": lambda path: KeyboardInterrupt(),
}


@pytest.fixture(params=sorted(INTERRUPTIONS))
def interruption(request):
    return INTERRUPTIONS[request.param]


def interrupt_midway(monkeypatch, owner, name: str, interruption, path_argument: int = 1) -> None:
    """Make the writer ``owner.name`` stop halfway as a full disk or a Ctrl-C would stop it: it
    writes its file, cuts it to half its bytes, then raises ``interruption(path)``."""
    real = getattr(owner, name)

    def write(*args, **kwargs):
        real(*args, **kwargs)
        path = Path(args[path_argument])
        with path.open("r+b") as handle:
            handle.truncate(path.stat().st_size // 2)
        raise interruption(path)

    monkeypatch.setattr(owner, name, write)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (temporary ones included) and its bytes."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def expected_error(interruption):
    return type(interruption("x"))


# --- the helper ------------------------------------------------------------------------------


@pytest.mark.parametrize("before", [None, b"the previous file\n"], ids=["no-file", "previous-file"])
@pytest.mark.parametrize("error", [RuntimeError("the writer failed"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_writer_that_fails_midway_changes_nothing(tmp_path, before, error):
    target = tmp_path / "table.csv"
    if before is not None:
        target.write_bytes(before)
    with pytest.raises(type(error)), files.atomic_path(target) as temporary:
        assert temporary.parent == tmp_path and temporary.name.startswith(".table.csv.") and temporary.suffix == ".tmp"
        temporary.write_text("half of the new")
        raise error
    assert snapshot(tmp_path) == ({} if before is None else {"table.csv": before})


def test_a_finished_write_replaces_the_file_with_the_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "report.md"
    files.write_text_atomic(target, "old")
    (tmp_path / "plain").write_text("made by open()")
    assert files.write_text_atomic(target, "new") == target
    assert snapshot(tmp_path) == {"sub/report.md": b"new", "plain": b"made by open()"}
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)


def test_two_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    target = tmp_path / "seed0.json"
    with files.atomic_path(target) as first, files.atomic_path(target) as second:
        assert first != second
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first" and snapshot(tmp_path) == {"seed0.json": b"first"}


# --- every writer ----------------------------------------------------------------------------


def valid_record() -> dict:
    hparams = {"lr": 1e-3}
    run = {"task": "sst2", "variant": "lora", "setting": "default", "model": "minilm", "seed": 0, "hparams": hparams,
           "config_hash": records.config_hash(hparams)}
    record = records.new_record(run, {"device": "cpu"})
    record.update(status="failed", error={"type": "DivergedError", "message": "loss is nan", "step": 3})
    return record


@pytest.mark.parametrize("previous", [False, True], ids=["no-file", "previous-file"])
def test_a_record_write_that_fails_leaves_the_previous_record(tmp_path, monkeypatch, previous):
    path = records.record_path(tmp_path, "sst2", "lora", "default", 0)
    if previous:
        records.write_atomic(path, valid_record())
    before = snapshot(tmp_path)
    unstorable = valid_record()
    unstorable["error"]["detail"] = object()  # json fails on it partway through the record
    with pytest.raises(TypeError):
        records.write_atomic(path, unstorable)
    assert snapshot(tmp_path) == before

    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)  # where a full disk shows on file systems that allocate late
    with pytest.raises(OSError, match="No space left"):
        records.write_atomic(path, valid_record())
    assert snapshot(tmp_path) == before


def attached_lora() -> torch.nn.Module:
    model = build_model("bert")
    lora = variants.get("lora")
    adapters.attach(model, lora, variants.make_config(lora, {"rank": 4, "alpha": 8.0}))
    return model


@pytest.mark.parametrize("previous", [False, True], ids=["no-file", "previous-file"])
def test_an_adapter_save_interrupted_midway_leaves_the_previous_adapter(tmp_path, monkeypatch, interruption, previous):
    model = attached_lora()
    path = tmp_path / "seed0.safetensors"
    if previous:
        adapters.save(model, path)
    before = snapshot(tmp_path)
    interrupt_midway(monkeypatch, adapters, "save_file", interruption)
    with pytest.raises(expected_error(interruption)):
        adapters.save(model, path)
    assert snapshot(tmp_path) == before


def test_a_peft_export_interrupted_midway_leaves_the_previous_export(tmp_path, monkeypatch, interruption):
    model = attached_lora()
    adapters.export_peft(model, tmp_path / "peft")
    before = snapshot(tmp_path)
    interrupt_midway(monkeypatch, adapters, "save_file", interruption)
    with pytest.raises(expected_error(interruption)):
        adapters.export_peft(model, tmp_path / "peft")
    assert snapshot(tmp_path) == before


def checkpoint_of(model: torch.nn.Module, record: Path):
    """A checkpointer and the arguments of its ``save``, after one optimizer step (so AdamW has moments)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**make_batch()).loss.backward()
    optimizer.step()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpointer = checkpoint.Checkpointer(record, "h", 1, torch.device("cpu"), "fp32")
    return checkpointer, (model, optimizer, schedule, torch.Generator(), measure.Throughput(torch.device("cpu"), 0), None, {"step": 1})


def test_a_checkpoint_save_interrupted_midway_leaves_the_previous_checkpoint(tmp_path, monkeypatch, interruption):
    checkpointer, arguments = checkpoint_of(attached_lora(), tmp_path / "seed0.json")
    checkpointer.save(*arguments)
    before = snapshot(tmp_path)
    interrupt_midway(monkeypatch, checkpoint, "save_file", interruption)
    with pytest.raises(expected_error(interruption)):
        checkpointer.save(*arguments)
    assert snapshot(tmp_path) == before
    assert checkpoint.read_state(checkpointer.path)["step"] == 1


def test_removing_a_checkpoint_also_removes_what_a_killed_write_left(tmp_path):
    checkpointer, arguments = checkpoint_of(attached_lora(), tmp_path / "seed0.json")
    checkpointer.save(*arguments)
    (tmp_path / f".{checkpointer.path.name}.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # what SIGKILL mid-write leaves
    (tmp_path / "seed1.ckpt.safetensors").write_bytes(b"another run's")
    checkpointer.remove()
    assert snapshot(tmp_path) == {"seed1.ckpt.safetensors": b"another run's"}


@pytest.fixture
def results(tmp_path):
    """Two runs' records and the tables, figures and report made from them."""
    write_run(tmp_path, "sst2", "full", 0, 0.90, trainable=FULL_PARAMS)
    write_run(tmp_path, "sst2", "lora", 0, 0.85, trainable=LORA_PARAMS)
    report.build_report(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("owner", "name", "path_argument"), [(pd.DataFrame, "to_csv", 1), (Path, "write_text", 0)],
                         ids=["csv", "markdown"])
def test_tables_interrupted_midway_stay_as_they_were(results, monkeypatch, interruption, owner, name, path_argument):
    before = snapshot(results / "tables")
    interrupt_midway(monkeypatch, owner, name, interruption, path_argument)
    with pytest.raises(expected_error(interruption)):
        aggregate.write_tables(results)
    assert snapshot(results / "tables") == before


def test_figures_and_the_report_interrupted_midway_stay_as_they_were(results, monkeypatch, interruption):
    before = snapshot(results)
    with monkeypatch.context() as patch:
        interrupt_midway(patch, Figure, "savefig", interruption)
        with pytest.raises(expected_error(interruption)):
            plots.write_figures(results)
    assert snapshot(results) == before
    interrupt_midway(monkeypatch, Path, "write_text", interruption, path_argument=0)
    with pytest.raises(expected_error(interruption)):
        report.build_report(results, rebuild=False)
    assert snapshot(results) == before
