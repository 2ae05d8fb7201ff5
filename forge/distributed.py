"""Data parallelism on torch.distributed: DDP on processes started by torch's launcher (torchrun).

Everything rank-dependent is defined on the GLOBAL batch, so a run does not depend on the world size W:

    data          rank r trains on rows [r*b/W, (r+1)*b/W) of each global micro-batch of b rows (rank_slice)
    token counts  losses divide by the global token count / W (DDP then averages: exactly the global mean)
    batch terms   coherence / diversity see the pooled representations of every rank (gather_rows, autograd-
                  aware: its backward sums the gradient of every rank's copy of the loss, DDP divides by W)
                  Both are applied by forge.train.objective after the forward: the model holds no collective.
    QK-clip       per-head max logits all-reduced (MAX) before deciding (forge.optim.qk_clip)
    flags         non-finite gradients are averaged into every rank's gradient; the stop flag (Ctrl-C,
                  SIGTERM) is all-reduced (any_rank) at every step boundary
    metrics       averaged over ranks (maxima: MAX) before rank 0 alone logs them (reduce_metrics)

Nothing here is called unless a process group is initialised (init_from_env), so single-process runs
never touch torch.distributed. See ../shared/reference/distributed.md for the design and its sources.
"""
from __future__ import annotations

import datetime as dt
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from forge.errors import ForgeError

# Rank 0 evaluates, probes and writes checkpoints while the other ranks wait in the next step's collectives:
# the timeout must cover the longest of those (a full phase1 evaluation on a CPU takes minutes).
COLLECTIVE_TIMEOUT = dt.timedelta(minutes=60)
# metrics that are maxima over the batch: reduced with MAX; every other metric is a mean over equal shares
MAX_METRICS = ("attn/logit_max",)


def initialised() -> bool:
    """Whether this process is in a process group (torchrun worker after init_from_env)."""
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes metrics, W&B, the live view, checkpoints and status."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return initialised()


SINGLE = World()


def launched_by_torchrun() -> bool:
    """True in a worker started by torchrun / torch.distributed.run (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device_setting: str) -> World:
    """Join the process group torchrun describes in the environment: gloo on CPU; on CUDA nccl for CUDA
    tensors (and gloo for CPU ones), one GPU per local rank."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_setting == "cuda" or (device_setting == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
    if not initialised():
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return World(rank, size, local_rank)


def shutdown() -> None:
    if initialised():
        dist.barrier()      # rank 0 finishes its writes before any process of the job exits
        dist.destroy_process_group()


def exit_worker(code: int) -> None:
    """End a worker process now, after shutdown(): flush, then os._exit. A normal interpreter exit after a clean
    destroy_process_group aborts now and then in torch's C++ teardown ("terminate called without an active
    exception", ~1 run in 8 here with gloo, torch 2.13), which torchrun reports as a failed worker."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def check_batch_split(batch_size: int, grad_accum: int, world_size: int) -> None:
    """The global batch must split into grad_accum micro-batches of W equal rank slices."""
    if batch_size % (grad_accum * world_size):
        raise ForgeError(f"data.batch_size = {batch_size} does not split over {world_size} processes x "
                         f"data.grad_accum = {grad_accum} micro-batches (needs a multiple of "
                         f"{grad_accum * world_size}); change the batch size or the number of processes")


def rank_slice(rows: torch.Tensor, world: World) -> torch.Tensor:
    """Rank r's equal share of a global (micro-)batch: rows [r*b/W, (r+1)*b/W)."""
    return rows.chunk(world.size)[world.rank] if world.size > 1 else rows


# ---------------------------------------------------------------------------------------------- collectives
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a tensor (out of place; not differentiable: use for counts and statistics)."""
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def world_size() -> int:
    return dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any rank (e.g. a stop request that reached one process)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (rank order = the global batch's row order), differentiably: the
    backward pass sums the gradient each rank's copy of the downstream loss sends to these rows."""
    from torch.distributed import _functional_collectives as fc

    gather = getattr(fc, "all_gather_single_autograd", None)   # torch >= 2.13; the older name warns there
    if gather is None:
        return fc.all_gather_tensor_autograd(t.contiguous(), gather_dim=0, group=dist.group.WORLD)
    return gather(t.contiguous(), gather_dim=0, group=dist.group.WORLD)


def reduce_metrics(metrics: dict[str, torch.Tensor | float], device: torch.device) -> dict[str, torch.Tensor]:
    """One all-reduce for the means and one for the maxima, over the sorted keys (every rank logs the same
    keys: they come from the same code path). Returns 0-dim tensors, equal on every rank."""
    keys = sorted(metrics)
    maxima = [k for k in keys if k in MAX_METRICS]
    means = [k for k in keys if k not in MAX_METRICS]
    size = world_size()
    out: dict[str, torch.Tensor] = {}
    for names, op in ((means, dist.ReduceOp.SUM), (maxima, dist.ReduceOp.MAX)):
        if not names:
            continue
        packed = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64).to(device).reshape(())
                              for k in names])
        dist.all_reduce(packed, op=op)
        if op == dist.ReduceOp.SUM:
            packed = packed / size
        out.update(zip(names, packed.unbind()))
    return out


def replicas_identical(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether every rank holds the same parameters and buffers: per tensor, (sum, sum of squares) in float64,
    compared by MAX == MIN across ranks. DDP keeps gradients equal, so any difference is a bug (a rank-local
    update or a rank-dependent branch) that would otherwise show only as a run that does not reproduce."""
    tensors = [*model.parameters(), *model.buffers()]
    sig = torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().square().sum()])
                       for t in tensors]).flatten().to(device)
    high, low = sig.clone(), sig.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return bool(torch.equal(high, low))


def broadcast_text(text: str, max_bytes: int = 512) -> str:
    """Rank 0's string on every rank (e.g. the run id), as bytes in a CPU tensor (gloo): no pickle."""
    buf = torch.zeros(max_bytes, dtype=torch.uint8)
    length = torch.zeros(1, dtype=torch.long)
    if dist.get_rank() == 0:
        raw = text.encode()
        if len(raw) > max_bytes:
            raise ValueError(f"cannot broadcast {len(raw)} bytes (at most {max_bytes})")
        buf[:len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        length[0] = len(raw)
    dist.broadcast(length, 0)
    dist.broadcast(buf, 0)
    return bytes(buf[:int(length.item())].tolist()).decode()
