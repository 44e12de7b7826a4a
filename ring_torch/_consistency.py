"""The consistency check of a distributed ring call: one small ``all_gather`` of every rank's
status and argument codes before any block is sent, so all ranks return or all raise."""

from __future__ import annotations

import json
from datetime import timedelta

import torch

__all__ = ["check_consistent", "float_bits", "DTYPE_CODES", "RingCheckError"]


DTYPE_CODES = {torch.float64: 1, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4}
_TEXT_BYTES = 4096  # per rank, in the second exchange (differing values and error messages)


class RingCheckError(ValueError):
    """The ranks of a ring disagree on their inputs or config, or some of them rejected theirs."""


def _gather(group, values: torch.Tensor, timeout: float) -> torch.Tensor:
    """``[world, ...]``: ``values`` of every rank, by an ``all_gather`` whose completion is
    awaited at most ``timeout`` seconds (``TimeoutError``)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    gathered = [torch.empty_like(values) for _ in range(world)]
    work = dist.all_gather(gathered, values, group=group, async_op=True)
    try:
        work.wait(timeout=timedelta(seconds=timeout))
    except RuntimeError as e:
        raise TimeoutError(
            f"the ring's consistency exchange did not complete within {timeout=} s on rank "
            f"{dist.get_rank(group)}: some rank of the process group did not call "
            f"ring_dilated_attention (or called it with another process group); the process group "
            f"should not be used further ({e})") from e
    return torch.stack(gathered)


def _encode_text(text: str) -> torch.Tensor:
    data = text.encode("utf-8")[:_TEXT_BYTES]
    buf = torch.zeros(_TEXT_BYTES, dtype=torch.uint8)
    buf[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    return buf


def _decode_text(buf: torch.Tensor) -> str:
    data = bytes(buf.tolist()).rstrip(b"\0")
    return data.decode("utf-8", errors="replace")


def check_consistent(group, fields: dict, device: torch.device, shared: dict | None = None,
                     compare: bool = True, error: Exception | None = None,
                     values: dict | None = None, timeout: float = 300.0) -> dict:
    """The one small exchange every distributed call makes before its first hop.

    ``fields`` are int64 codes compared across ranks, ``values`` their readable values (for the
    message); ``error`` is this rank's validation error, if any (its ``ok / error`` status is
    exchanged too). Every rank sees every rank's codes, so all ranks take the same branch: they
    all return, or all raise. When some codes differ or some rank failed, a second exchange
    sends each rank's differing values and error message, and every rank raises the same
    :class:`RingCheckError` naming each differing field with its per-rank values (and each
    failing rank's error); when every rank failed with the same message and nothing differs,
    each re-raises its own error. ``shared`` values are not compared: every rank gets rank 0's
    (the dropout seed). Each exchange waits at most ``timeout`` seconds (``TimeoutError``)."""
    import torch.distributed as dist

    shared, values = shared or {}, values or {}
    if dist.get_backend(group) != "nccl":  # NCCL needs device tensors, gloo takes CPU ones
        device = torch.device("cpu")
    codes = [0 if error is None else 1] + list(fields.values()) + list(shared.values())
    rows = _gather(group, torch.tensor(codes, dtype=torch.int64, device=device), timeout).cpu()
    status, compared = rows[:, 0], rows[:, 1:1 + len(fields)]
    names = list(fields)
    differ = [names[c] for c in range(len(names))
              if compare and not bool((compared[:, c] == compared[0, c]).all())]
    failed = [r for r in range(rows.shape[0]) if status[r]]
    if differ or failed:
        text = json.dumps({"values": {name: repr(values.get(name, fields[name])) for name in differ},
                           "error": None if error is None else f"{type(error).__name__}: {error}"})
        texts = _gather(group, _encode_text(text).to(device), timeout).cpu()
        reports = []
        for r in range(texts.shape[0]):
            try:
                reports.append(json.loads(_decode_text(texts[r])))
            except ValueError:  # a message cut at _TEXT_BYTES
                reports.append({"values": {}, "error": _decode_text(texts[r])})
        errors = {r: reports[r]["error"] for r in failed}
        if error is not None and not differ and len(failed) == rows.shape[0] and len(set(errors.values())) == 1:
            raise error  # the same error everywhere: every rank raises its own
        parts = [f"{name}: [{', '.join(str(rep['values'].get(name, '?')) for rep in reports)}]"
                 for name in differ]
        parts += [f"rank {r} raised {msg}" for r, msg in errors.items()]
        raise RingCheckError(f"ring ranks disagree on inputs/config (per rank): {'; '.join(parts)}")
    first = rows[0, 1 + len(fields):].tolist()
    return dict(zip(shared, first))


def float_bits(x: float) -> int:
    """The bits of ``x`` as a float64, as an int (compared exactly across ranks)."""
    return torch.tensor([float(x)], dtype=torch.float64).view(torch.int64).item()

