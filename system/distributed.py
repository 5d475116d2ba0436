"""Several processes under torchrun.

Under torchrun every process runs the whole script on its own device (one GPU per process, or
CPU), holds the whole dataset, and trains on its own equal share of every global batch;
DistributedDataParallel averages the gradients, so the weights stay identical everywhere. The
random numbers of a step are drawn for the global batch on every process, each taking its own
rows (batch_noise), so N processes compute what one process computes on the whole batch. Rank
0 alone writes files and prints. In a plain run, this process is rank 0 of 1 and nothing here
initialises anything."""
import argparse
import contextlib
import datetime
import inspect
import os
import sys

import torch

from system import errors, hardware


def processes_note(batch_size: int) -> str:
    """', 2 processes of 64 images each' under torchrun, '' in a plain run (for the start line)."""
    n = world_size()
    return f", {n} processes of {batch_size // n} images each" if n > 1 else ""


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    """This process's place among all processes (0 in a plain run). Read from torchrun's
    environment, so it is known before the process group is joined."""
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    """This process's place among the processes of its machine."""
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def init_distributed(args: argparse.Namespace) -> torch.device:
    """The device this process trains on. Under torchrun, also check that --batch-size divides
    among the processes, take the GPU of this process's local rank, join the process group
    (NCCL on GPUs, gloo on CPUs) and silence stdout on every rank but 0."""
    device = hardware.pick_device(args.device)
    if not launched_by_torchrun():
        return device
    n = world_size()
    if args.batch_size % n:
        below, above = args.batch_size // n * n, (args.batch_size // n + 1) * n
        raise errors.UserError(f"--batch-size {args.batch_size} is the global batch, shared by {n} processes, "
                               f"and does not divide by {n}; use a multiple of {n} such as "
                               f"{above if below == 0 else f'{below} or {above}'}")
    if device.type == "mps":
        raise errors.UserError("torchrun cannot use Apple's MPS GPU (PyTorch has no process group for it); "
                               "pass --device cpu")
    if device.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise errors.UserError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this "
                                   f"machine, which has {torch.cuda.device_count()} GPUs; pass --nproc_per_node "
                                   f"{torch.cuda.device_count()} or fewer")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    # generous: the others wait while rank 0 downloads the data or trains evaluate.py's network
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         timeout=datetime.timedelta(minutes=60))
    if not is_main():
        sys.stdout = open(os.devnull, "w")
    return device


def _flag_tensor(value: float) -> torch.Tensor:
    """A one-element tensor where the process group's backend can send it (NCCL: the GPU)."""
    nccl = torch.distributed.get_backend() == "nccl"
    return torch.tensor([value], device=torch.cuda.current_device() if nccl else "cpu")


def any_process(flag: bool) -> bool:
    """Whether `flag` is true on any process (every process must call this)."""
    if world_size() == 1:
        return flag
    t = _flag_tensor(float(flag))
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


@contextlib.contextmanager
def main_first():
    """Run the block on rank 0 before the other processes (so only rank 0 downloads). If it fails
    there, the others stop too instead of waiting for rank 0 forever."""
    if world_size() == 1:
        yield
        return
    if is_main():
        ok = False
        try:
            yield
            ok = True
        finally:
            torch.distributed.broadcast(_flag_tensor(float(ok)), src=0)  # releases the others
    else:
        t = _flag_tensor(0.0)
        torch.distributed.broadcast(t, src=0)
        if not t.item():
            raise errors.UserError("rank 0 failed to prepare the run (see its error); stopping")
        yield


def ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """module wrapped in DistributedDataParallel (gradients averaged over the processes in its
    backward pass) under torchrun with more than one process; module itself otherwise.

    Buffers are not broadcast from rank 0 at every forward pass (DDP's default): the
    discriminator runs several forward passes a step, and re-broadcasting BatchNorm's running
    statistics before each would replace every process's with rank 0's (and is a known source of
    in-place errors in autograd). The training scripts keep the buffers identical themselves
    (average_buffers, or SyncBatchNorm)."""
    if world_size() == 1:
        return module
    DDP = torch.nn.parallel.DistributedDataParallel
    # the switch has either name, by PyTorch version (forward_sync_buffers still syncs once at
    # the start, which is harmless)
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})


@torch.no_grad()
def average_buffers(*modules: torch.nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over the processes, in
    one all-reduce. Running means are linear in the batch means, so this gives each layer the
    running mean of the global batch."""
    if world_size() == 1:
        return
    buffers = [b for m in modules for b in m.buffers() if b.dtype.is_floating_point]
    packed = torch.cat([b.flatten() for b in buffers])  # one message, not one per buffer
    torch.distributed.all_reduce(packed)
    packed /= world_size()
    for b, v in zip(buffers, packed.split([b.numel() for b in buffers])):
        b.copy_(v.view_as(b))


def batch_noise(draw, local_batch: int, *shape: int, device: torch.device) -> torch.Tensor:
    """draw(B, *shape) (torch.randn, torch.rand) for the global batch B = local_batch x
    processes, of which this process keeps its own rows, as it keeps its own rows of the
    images. Every process draws the same numbers from the same seed, so the run's randomness,
    its random state and its results do not depend on how many processes share the batch."""
    return own_rows(draw(local_batch * world_size(), *shape, device=device))


def own_rows(batch: torch.Tensor) -> torch.Tensor:
    """This process's equal share of the rows of a global batch (all of them in a plain run)."""
    share = len(batch) // world_size()
    return batch[rank() * share:(rank() + 1) * share]


def batch_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of t over the global batch (no gradient): the mean over processes of each
    process's mean, since every process holds an equal share."""
    m = t.detach().mean()
    if world_size() > 1:
        torch.distributed.all_reduce(m)
        m /= world_size()
    return m
