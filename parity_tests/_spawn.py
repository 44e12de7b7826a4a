"""Local multi-process runs for the torch ring tests: spawn, a hard deadline, results per rank."""

from __future__ import annotations

import os
import shutil
import tempfile
import time


def spawn_ranks(worker, world: int, *args, deadline_s: float, label: str) -> list:
    """Runs ``worker(rank, world, init_file, out_dir, *args)`` in ``world`` spawned processes and
    returns what each rank saved as ``out_dir/rank{rank}.pt``.

    The processes are killed and a ``TimeoutError`` naming ``label`` is raised if they have not all
    finished within ``deadline_s`` seconds, so a hang fails the test instead of blocking the suite.
    """
    import torch
    import torch.multiprocessing as mp

    tmp = tempfile.mkdtemp(prefix=f"ring_torch_{label.replace(' ', '_')}_p{world}_")
    ctx = mp.start_processes(worker, args=(world, os.path.join(tmp, "init"), tmp, *args), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world}-process {label} exceeded {deadline_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    try:
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
