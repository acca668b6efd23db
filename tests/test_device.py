"""Device choice: local runs on a GPU machine keep one run per GPU (checked without a GPU by
standing in for torch.cuda's device queries)."""

import fcntl
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from lorabench import run

ROOT = Path(__file__).resolve().parent.parent


def release(previous):
    """Close the locks a test claimed and give back what this process held before it."""
    for handle, _ in run._claimed_gpu:
        handle.close()
    run._claimed_gpu[:] = previous


def fake_gpus(monkeypatch, tmp_path, uuids):
    monkeypatch.setattr(run, "GPU_LOCKS", tmp_path / "locks")
    monkeypatch.setattr(run, "GPU_WAIT_S", 0.01)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(uuids))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(uuid=uuids[index]))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)


def test_each_run_claims_a_gpu_of_its_own(monkeypatch, tmp_path):
    fake_gpus(monkeypatch, tmp_path, ["GPU-aaaa", "GPU-bbbb"])
    claimed = run._claimed_gpu.copy()
    try:
        (tmp_path / "locks").mkdir()
        other_run = open(tmp_path / "locks" / "GPU-aaaa.lock", "w")  # another run holds the first GPU
        fcntl.flock(other_run, fcntl.LOCK_EX)
        run._claimed_gpu.clear()
        assert run.pick_device("auto") == torch.device("cuda", 1)
        assert run.pick_device("auto") == torch.device("cuda", 1)  # a second run in this process keeps its GPU
        assert sorted(path.name for path in (tmp_path / "locks").iterdir()) == ["GPU-aaaa.lock", "GPU-bbbb.lock"]
        assert run.pick_device("cuda:0") == torch.device("cuda", 0)  # an explicit device takes no lock
        other_run.close()
    finally:
        release(claimed)


def test_a_run_waits_while_every_gpu_is_held_by_another_process(monkeypatch, tmp_path):
    fake_gpus(monkeypatch, tmp_path, ["GPU-aaaa"])
    (tmp_path / "locks").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"handle = open({str(tmp_path / 'locks' / 'GPU-aaaa.lock')!r}, 'w')\n"
                               "fcntl.flock(handle, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(1.0)"],
                              stdout=subprocess.PIPE, text=True)
    claimed = run._claimed_gpu.copy()
    run._claimed_gpu.clear()
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        assert run.pick_device("auto") == torch.device("cuda", 0)
        assert time.perf_counter() - started > 0.5  # it got the GPU only once the other process had let go
    finally:
        holder.wait()
        release(claimed)
