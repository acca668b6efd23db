"""Section 4, ``jobs``: how the study's training jobs best share a CPU. ``job_worker`` runs in
processes of its own (spawned), which import it from this module."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch

import variants
from lorabench import adapters
from lorabench.bench.common import Setup, lora_model, ours


def job_worker(connection, setup: Setup, threads: int) -> None:
    """One training job's process for ``section_jobs``: a LoRA and a full fine-tune of the bench's
    model, trained ``steps`` steps at a time on command, with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    lora_net, lora_cfg = lora_model(setup)
    full, full_net = variants.get("full"), setup.fresh_model()
    adapters.attach(full_net, full, full.Config())
    trainees = {"lora": ours(lora_net, variants.get("lora"), lora_cfg, setup, max_steps=1),
                "full": ours(full_net, full, full.Config(), setup, max_steps=1)}
    for trainee in trainees.values():
        for _ in range(setup.warmup):
            trainee.step(setup)
    connection.send("ready")
    while (command := connection.recv()) is not None:
        workload, steps = command
        for _ in range(steps):
            trainees[workload].step(setup)
        connection.send("done")


def timed_together(connections: list, workload: str, steps: int) -> float:
    """Milliseconds from telling every job to train ``steps`` steps to the last one's answer."""
    started = time.perf_counter()
    for connection in connections:
        connection.send((workload, steps))
    for connection in connections:
        connection.recv()
    return 1e3 * (time.perf_counter() - started)


def section_jobs(setup: Setup, steps: int = 2) -> dict[str, Any]:
    """The default profile's choice of two training jobs at a time with half the cores each,
    against one job at a time with all of them: the same training steps, in separate processes
    (as Snakemake runs jobs), alternately: two half-core jobs of ``steps`` steps each together,
    one all-core job of 2 x ``steps``, one half-core job of ``steps`` alone. A throughput ratio
    above 1 means the two jobs get through more steps; the last side shows what the two jobs
    cost each other (memory bandwidth, shared caches)."""
    import multiprocessing

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    half = max(1, cores // 2)
    print(f"\n== jobs: two training jobs with {half} thread(s) each against one with {cores}, separate processes, alternating ==")
    if setup.device.type != "cpu":
        print(f"skipped: on {setup.device.type} a training job holds a whole device (profiles/slurm: one GPU per job)")
        return {"skipped": f"device {setup.device.type}"}
    context = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    for threads in (half, half, cores):
        parent, child = context.Pipe()
        process = context.Process(target=job_worker, args=(child, setup, threads), daemon=True)
        process.start()
        pipes.append(parent)
        processes.append(process)
    try:
        for connection in pipes:
            connection.recv()
        result: dict[str, Any] = {"cores": cores, "threads_per_job": half, "steps_per_job": steps}
        for workload in ("lora", "full"):
            two, one, alone = [], [], []
            for _ in range(setup.rounds):
                two.append(timed_together(pipes[:2], workload, steps))
                one.append(timed_together(pipes[2:], workload, 2 * steps))
                alone.append(timed_together(pipes[:1], workload, steps))
            entry = {"two_jobs_ms": statistics.median(two), "one_job_ms": statistics.median(one),
                     "alone_ms": statistics.median(alone),
                     "throughput_two_over_one": statistics.median(b / a for a, b in zip(two, one, strict=True)),
                     "slowdown_together": statistics.median(a / c for a, c in zip(two, alone, strict=True)),
                     "rounds_two_jobs_ms": two, "rounds_one_job_ms": one, "rounds_alone_ms": alone}
            result[workload] = entry
            print(f"{workload:5} two {half}-thread jobs x {steps} steps {entry['two_jobs_ms']:7.1f} ms, one {cores}-thread job x "
                  f"{2 * steps} steps {entry['one_job_ms']:7.1f} ms: two jobs train {entry['throughput_two_over_one']:.3f}x as "
                  f"many steps a second; each runs {entry['slowdown_together']:.3f}x as long as alone")
    finally:
        for connection in pipes:
            connection.send(None)
        for process in processes:
            process.join(timeout=30)
    return result
