"""Undecodable or corrupt local data ends a run as a DataError naming the file, the line and the fix.

Every local layout a task declares (its ``local_layout``, braces expanded) is written here with
one fault in all of its files: random bytes, a byte that is not UTF-8 on a known line, a line
longer than csv accepts (tables), and for gzip files a file that is not gzip, a truncated
stream and a corrupt one. Whichever file the task reads first must fail as a DataError that
names it, with the line where the fault's line is known.
"""

from __future__ import annotations

import gzip
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import tasks
from lorabench import run
from tests.helpers import tiny_sst2

TABLES = (".tsv", ".csv")


def expand(pattern: str) -> list[str]:
    """Shell brace expansion: ``a/{b,c}.tsv`` -> ``a/b.tsv``, ``a/c.tsv``."""
    braces = re.search(r"\{([^{}]*)\}", pattern)
    if braces is None:
        return [pattern]
    head, tail = pattern[:braces.start()], pattern[braces.end():]
    return [path for choice in braces[1].split(",") for path in expand(head + choice + tail)]


def layouts(task: tasks.Task) -> list[list[str]]:
    """The files of each local layout ``task`` declares; a ``*`` stands for one file."""
    declared = task.local_layout.split(" (")[0]
    return [[path.replace("*", "0_1") for path in expand(layout)] for layout in declared.split(" or ")]


@dataclass(frozen=True)
class Fault:
    """One way a local file can be broken, to which files it applies, and where the message must place it."""

    name: str
    content: Callable[[str], bytes]  # file name -> its bytes on disk
    applies: Callable[[str], bool]
    line: int | None = None  # the line the message must name, where the fault puts it on a known one
    byte: int | None = None  # the offset of the first byte that is not UTF-8 (of the uncompressed text)


def first_bad_byte(data: bytes) -> int:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start
    raise AssertionError("the fault's bytes decode as UTF-8")


RANDOM = random.Random(0).randbytes(4096).replace(b"\n", b" ")  # one line, so the first bad byte is on line 1
BAD_LINE_3 = b"one\ttwo\r\nthree\tfour\r\nfi\xffve\tsix\r\n"
TEXT = b"".join(b'{"text": "review %d", "label": 0}\n' % i for i in range(2000))


def gzipped_if_named(data: bytes) -> Callable[[str], bytes]:
    return lambda name: gzip.compress(data, mtime=0) if name.endswith(".gz") else data


def corrupt_deflate(name: str) -> bytes:
    data = bytearray(gzip.compress(TEXT, mtime=0))
    data[10] = 0b111  # the first deflate block: final, of the reserved type 3
    return bytes(data)


FAULTS = [
    Fault("random-bytes", gzipped_if_named(RANDOM), lambda name: True, line=1, byte=first_bad_byte(RANDOM)),
    Fault("not-utf8-on-line-3", gzipped_if_named(BAD_LINE_3), lambda name: True, line=3, byte=first_bad_byte(BAD_LINE_3)),
    Fault("line-over-csv-limit", lambda name: b"x" * 200_000 + b"\n", lambda name: name.endswith(TABLES), line=1),
    Fault("not-gzip", lambda name: TEXT, lambda name: name.endswith(".gz")),
    Fault("truncated-gzip", lambda name: gzip.compress(TEXT, mtime=0)[:1000], lambda name: name.endswith(".gz")),
    Fault("corrupt-gzip", corrupt_deflate, lambda name: name.endswith(".gz")),
]
CASES = [pytest.param(task.name, files, fault, id=f"{task.name}-{Path(files[0]).parts[0]}-{fault.name}")
         for task in tasks.REGISTRY.values() for files in layouts(task) for fault in FAULTS if fault.applies(files[0])]


@pytest.mark.parametrize("task_name, files, fault", CASES)
def test_a_fault_names_the_file_line_and_fix(task_name, files, fault, tmp_path):
    paths = [tmp_path / file for file in files]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(fault.content(path.name))
    with pytest.raises(tasks.DataError) as raised:
        tasks.get(task_name).load_local(tmp_path)
    message = str(raised.value)
    named = [path for path in paths if f"{path}:" in message]
    assert named, message
    assert "re-download it" in message
    if fault.line is not None:
        assert f"{named[0]}:{fault.line}: " in message
    if fault.byte is not None:
        assert f"at byte {fault.byte}" in message


def test_a_run_on_random_bytes_exits_2_naming_the_file_before_training(tmp_path, capsys):
    data = tiny_sst2(tmp_path / "data")
    train = data / "glue" / "SST-2" / "train.tsv"
    train.write_bytes(RANDOM)
    out = tmp_path / "record.json"
    assert run.main(["--task", "sst2", "--variant", "lora", "--set", "max_steps=1", f"data_dir={data}", "--out", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert f"{train}:1: not UTF-8" in stderr and "re-download it" in stderr
    assert "Traceback" not in stderr
    assert not out.exists()
