"""The JAX ring across two processes: ``jax.distributed`` on localhost, CPU collectives through gloo.

Two child processes with 2 simulated CPU devices each form one 4-device mesh; ``sharded_dilated_attention``
runs on global arrays built from each process's local shards, and each process checks its addressable
shards of the output, the LSE and the gradients against the float64 oracle and the single-device
``dilated_attention``. The test process itself never initializes ``jax.distributed``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_S = 300  # about 30 s alone; CI runs it beside other tests on 2 cores

CHILD = r'''
import os
import sys

process_id, port = int(sys.argv[1]), int(sys.argv[2])

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id,
                           initialization_timeout=60)

import jax.numpy as jnp
import numpy as np

import ring_jax
from parity_tests import oracle

assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)

# n=64 on 4 devices (L=16, process 0 holding [0, 32), process 1 [32, 64)): w=8 is local, w=32 spans
# the two devices of one process, w=64 spans all four, so the ring passes K/V between the processes.
n, h, h_kv, d = 64, 6, 3, 8
W, R = (8, 32, 64), (1, 2, 4)
rng = np.random.default_rng(0)  # every process draws the same global arrays, passes only its part
q, k, v = (rng.standard_normal((2, n, heads, d)) for heads in (h, h_kv, h_kv))
ct = rng.standard_normal((2, n, h, d))


def check(name, global_array, expected, tol):
    shards = global_array.addressable_shards
    assert len(shards) == 2 and not global_array.is_fully_addressable, name
    for s in shards:
        assert s.device.process_index == process_id, (name, s.device)
        got = np.asarray(s.data)
        assert got.dtype == np.float64, (name, got.dtype)
        want = expected[s.index]
        empty = np.isneginf(want)  # the LSE is -inf on rows with no key (out 0 there)
        assert np.array_equal(np.isneginf(got), empty), (name, "the rows with no key differ")
        err = np.abs(np.where(empty, 0.0, got - np.where(empty, 0.0, want))).max()
        assert err <= tol, f"{name} shard {s.index[1]} on process {process_id}: max abs error {err:.3e} > {tol}"


# Both axis types: an Explicit mesh (make_mesh's default) under jax.set_mesh, and an Auto one.
for mix, axis_type in (("head_groups", jax.sharding.AxisType.Explicit), ("longnet", jax.sharding.AxisType.Auto)):
    mesh = jax.make_mesh((4,), ("sp",), axis_types=(axis_type,))
    assert [dev.process_index for dev in mesh.devices.flat] == [0, 0, 1, 1], mesh.devices
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "sp"))
    mine = slice(process_id * n // 2, (process_id + 1) * n // 2)  # this process's half of the sequence
    gq, gk, gv, gct = (jax.make_array_from_process_local_data(sharding, x[:, mine], x.shape) for x in (q, k, v, ct))
    kw = dict(segment_lengths=W, dilation_rates=R, mix=mix, is_causal=True)

    def loss(a, b, c, t):
        return jnp.sum(ring_jax.sharded_dilated_attention(a, b, c, mesh=mesh, **kw) * t)

    with jax.set_mesh(mesh):
        out, lse = ring_jax.sharded_dilated_attention(gq, gk, gv, mesh=mesh, return_lse=True, **kw)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(gq, gk, gv, gct)
    ref_out, ref_lse = oracle.dilated_attention(q, k, v, **kw)
    check(f"{mix} out", out, ref_out, 1e-10)
    check(f"{mix} lse", lse, ref_lse, 1e-10)
    local = jax.grad(lambda a, b, c: jnp.sum(ring_jax.dilated_attention(a, b, c, **kw) * ct), argnums=(0, 1, 2))
    for name, g, ref in zip(("dq", "dk", "dv"), grads, local(q, k, v)):
        check(f"{mix} {name}", g, np.asarray(ref), 1e-9)

jax.distributed.shutdown()
print(f"process {process_id}: ok", flush=True)
os._exit(0)  # the checks and the shutdown are done: skip the interpreter's teardown of the gloo runtime
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_sharded_ring_across_two_processes(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_X64="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    port = _free_port()
    procs, logs = [], []
    for i in range(2):
        out, err = open(tmp_path / f"p{i}.out", "w+"), open(tmp_path / f"p{i}.err", "w+")
        logs.append((out, err))
        procs.append(subprocess.Popen([sys.executable, str(script), str(i), str(port)], cwd=tmp_path, env=env,
                                      stdout=out, stderr=err))
    deadline = time.monotonic() + DEADLINE_S
    try:  # stop at the deadline, or as soon as one process fails (its peer would wait on the ring)
        while (time.monotonic() < deadline and any(p.poll() is None for p in procs)
               and not any(p.poll() for p in procs)):
            time.sleep(0.2)
        timed_out = time.monotonic() >= deadline and any(p.poll() is None for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    stdouts, report = [], []
    for i, (p, (out, err)) in enumerate(zip(procs, logs)):
        out.seek(0), err.seek(0)
        stdouts.append(out.read())
        report.append(f"--- process {i}: exit {p.returncode}\n--- stdout\n{stdouts[-1][-2000:]}\n"
                      f"--- stderr\n{err.read()[-6000:]}")
        out.close(), err.close()
    report = "\n".join(report)
    assert not timed_out, f"the 2-process run exceeded {DEADLINE_S} s (both killed)\n{report}"
    assert [p.returncode for p in procs] == [0, 0], report
    assert all(f"process {i}: ok" in text for i, text in enumerate(stdouts)), report
