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


def run_named_cases(rank, world, init_file, out_dir, module: str, names):
    """A spawned rank: joins a gloo group, runs ``module._run_case(case, rank, world)`` for each
    case of ``module.ALL_CASES`` named in ``names`` (an exception is recorded with its traceback,
    for the comparing test to report), and saves the results as ``out_dir/rank{rank}.pt``."""
    import importlib
    import traceback
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    mod = importlib.import_module(module)
    cases = {c.name: c for c in mod.ALL_CASES}
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            results[name] = mod._run_case(cases[name], rank, world)
        except Exception:  # noqa: BLE001 -- recorded; the comparing test reports it
            results[name] = {"exception": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - start
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def spawn_cases(module: str, cases, world: int, *, deadline_s: float, label: str) -> list[dict]:
    """Every case of ``cases`` with ``case.world == world`` in one spawn of ``world`` ranks
    (:func:`run_named_cases`); each rank's ``{name: result}``."""
    names = [c.name for c in cases if c.world == world]
    return spawn_ranks(run_named_cases, world, module, names, deadline_s=deadline_s, label=label)


def case_results(per_rank: list[dict], name: str) -> list[dict]:
    """Each rank's result of case ``name``; fails naming the rank whose case raised."""
    results = [res[name] for res in per_rank]
    for rank, res in enumerate(results):
        assert "exception" not in res, f"rank {rank}:\n{res['exception']}"
    return results
