"""Train a selora-adapted MLP for a few steps: one process, DDP, accelerate or FSDP2 (CPU, gloo).

Run by ``tests/distributed/test_distributed.py``; usable on its own::

    python tests/distributed/ddp_train.py --mode single --out single.pt
    python tests/distributed/ddp_train.py --mode ddp --nprocs 2 --out ddp.pt
    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29511 \\
        tests/distributed/ddp_train.py --mode ddp --out ddp.pt
    accelerate launch --cpu --num_processes 2 --main_process_ip 127.0.0.1 \\
        --main_process_port 29512 tests/distributed/ddp_train.py --mode accelerate --out acc.pt
    torchrun --nproc_per_node 2 ... tests/distributed/ddp_train.py --mode fsdp --out fsdp.pt

Every rank builds the model and its adapter *before* the process group exists,
so the construction cannot communicate; the spectral locations then are
all-gathered and compared. Each rank trains on its shard of one fixed global
batch, so the averaged gradients equal the single-process full-batch gradient.
After training, the trainable tensors are all-gathered and must be identical on
every rank; rank 0 writes them (and a report) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

import selora
from selora.spectral_bases import SparseSpectrum

GLOBAL_BATCH = 32
STEPS = 8
LR = 0.1


def build_model() -> nn.Module:
    """Return the adapted MLP; identical on every rank, no communication."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )
    adapter = selora.SpectralAdapter(
        basis="dct", base="dora", r=4, target_modules=["0", "2"], seed=11, modules_to_save=["4"]
    )
    return selora.inject(model, adapter)


def global_batch() -> tuple[Tensor, Tensor]:
    """Return the fixed global batch (same on every rank)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 16, generator=gen)
    y = torch.randn(GLOBAL_BATCH, 4, generator=gen)
    return x, y


def locations(model: nn.Module) -> Tensor:
    """Concatenate every spectral location set of ``model`` (module order)."""
    parts = [m.indices.flatten() for m in model.modules() if isinstance(m, SparseSpectrum)]
    return torch.cat(parts)


def trainable(model: nn.Module) -> dict[str, Tensor]:
    """Return the trainable tensors by (unwrapped) name, full (unsharded) and detached."""
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.removeprefix("module.")] = full.detach().clone()
    return out


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    backward: Callable[[Tensor], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[float]:
    """Run ``STEPS`` SGD-with-momentum steps of MSE on ``(x, y)``; return the losses."""
    opt = optimizer or torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9
    )
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        (backward or Tensor.backward)(loss)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def all_equal(tensor: Tensor) -> bool:
    """All-gather ``tensor`` and tell whether every rank holds exactly the same values."""
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return all(torch.equal(gathered[0], t) for t in gathered[1:])


def flat(tensors: dict[str, Tensor]) -> Tensor:
    """Concatenate the tensors of a name -> tensor dict in name order."""
    return torch.cat([tensors[k].flatten() for k in sorted(tensors)])


def run_single() -> dict[str, Any]:
    """Train in this process on the whole global batch."""
    model = build_model()
    x, y = global_batch()
    losses = train(model, x, y)
    return {"params": trainable(model), "losses": losses, "world_size": 1}


def summary(
    params: dict[str, Tensor], losses: list[float], world: int, same_locations: bool
) -> dict[str, Any]:
    """What every launcher reports: final parameters, losses, and agreement across ranks."""
    return {
        "params": params,
        "losses": losses,
        "world_size": world,
        "same_locations": same_locations,
        "same_params": all_equal(flat(params)),
    }


def run_ddp() -> dict[str, Any]:
    """Train with DistributedDataParallel (gloo); the model is built before the group exists."""
    model = build_model()
    assert not dist.is_initialized()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    same_locations = all_equal(locations(model))
    ddp = nn.parallel.DistributedDataParallel(model)
    x, y = global_batch()
    losses = train(ddp, x[rank::world], y[rank::world])
    report = summary(trainable(ddp), losses, world, same_locations)
    dist.barrier()
    return report


def run_accelerate() -> dict[str, Any]:
    """Train through ``accelerate.Accelerator`` (launched by ``accelerate launch --cpu``)."""
    from accelerate import Accelerator

    model = build_model()
    assert not dist.is_initialized()
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    same_locations = all_equal(locations(model))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)
    wrapped, opt = accelerator.prepare(model, opt)
    x, y = global_batch()
    losses = train(wrapped, x[rank::world], y[rank::world], accelerator.backward, opt)
    params = trainable(accelerator.unwrap_model(wrapped))
    report = summary(params, losses, world, same_locations)
    report["distributed_type"] = str(accelerator.distributed_type)
    accelerator.wait_for_everyone()
    return report


def run_fsdp() -> dict[str, Any]:
    """Train with FSDP2 (``fully_shard``) on a CPU device mesh over gloo."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    assert not dist.is_initialized()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    same_locations = all_equal(locations(model))
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model, mesh=mesh)
    x, y = global_batch()
    losses = train(model, x[rank::world], y[rank::world])
    report = summary(trainable(model), losses, world, same_locations)
    dist.barrier()
    return report


def run_fsdp_meta() -> dict[str, Any]:
    """FSDP2 on a model built and adapted on the meta device, then materialised.

    The large-model path: build and ``inject`` under ``torch.device("meta")``
    (no memory), shard, ``to_empty`` on the real device, then load the full
    state dict of a model built normally. The spectral locations are not in
    the state dict: they must be exact after materialisation all the same.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = build_model()
    assert all(p.is_meta for p in model.parameters())
    full = build_model().state_dict()  # what a checkpoint of the base + fresh adapter holds
    expected_locations = locations(build_model())
    assert not dist.is_initialized()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
    same_locations = all_equal(locations(model)) and torch.equal(
        locations(model), expected_locations
    )
    x, y = global_batch()
    losses = train(model, x[rank::world], y[rank::world])
    report = summary(trainable(model), losses, world, same_locations)
    dist.barrier()
    return report


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run(mode: str, out: str) -> None:
    """Train in ``mode`` on this rank; rank 0 writes the report to ``out``."""
    torch.set_num_threads(1)
    runners = {
        "single": run_single,
        "ddp": run_ddp,
        "accelerate": run_accelerate,
        "fsdp": run_fsdp,
        "fsdp-meta": run_fsdp_meta,
    }
    report = runners[mode]()
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(report, out)
    if dist.is_initialized():
        dist.destroy_process_group()


def _worker(rank: int, mode: str, out: str, world: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    run(mode, out)


def main() -> None:
    """Parse the arguments and train (forking ``--nprocs`` local ranks if asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode", choices=["single", "ddp", "accelerate", "fsdp", "fsdp-meta"], required=True
    )
    parser.add_argument("--out", required=True, help="where rank 0 writes the report (torch.save)")
    parser.add_argument(
        "--nprocs",
        type=int,
        default=0,
        help="fork this many local ranks (torch.multiprocessing) instead of being launched",
    )
    args = parser.parse_args()
    if args.nprocs and "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        # Fork, so that the children inherit the imported modules (importing torch and
        # transformers is slow). One warm-up build, single-threaded so that no OpenMP
        # pool exists to be forked, imports what inject imports lazily.
        torch.set_num_threads(1)
        build_model()
        worker_args = (args.mode, args.out, args.nprocs)
        method = "fork" if sys.platform == "linux" else "spawn"
        mp.start_processes(_worker, args=worker_args, nprocs=args.nprocs, start_method=method)
        return
    run(args.mode, args.out)


if __name__ == "__main__":
    main()
