"""What both training scripts share: flags, seeding, device, speed (precision, memory format,
fused optimisers, compilation), several processes (torchrun), run folder, checkpoints, stopping,
running means, metrics log, sample grids and curves. Only the models and the steps differ."""
import argparse
import contextlib
import ctypes
import datetime
import inspect
import json
import math
import os
import signal
import sys
import time
import zipfile
from pathlib import Path

import torch
from tqdm import tqdm


class UserError(Exception):
    """A problem the user can fix (a flag, a file); reported as one line, no traceback."""


_warned = set()


def warn(message: str) -> None:
    """One line on stderr, once per process however often the cause is met (under torchrun,
    from the first process of each machine only)."""
    if message not in _warned and local_rank() == 0:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr)


def run_main(main) -> None:
    """Call main(); a UserError becomes `error: ...` on stderr and exit status 1, and so does an
    operating-system error on a file (a read-only folder, a full disk): both name what to fix, and
    a traceback would only hide that. Under torchrun every process meets the same error, and the
    first process of each machine reports it."""
    try:
        main()
        barrier()  # under torchrun, all leave together: no process tears down while others still talk
    except (UserError, OSError) as e:
        if local_rank() != 0:
            # The first process meets the same error and reports it; when it exits, torchrun ends
            # this one. An error this process alone met is reported after the wait.
            time.sleep(30)
        print(f"error: {e if isinstance(e, UserError) else describe_os_error(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop, or a second one inside it
        if local_rank() == 0:
            print("\ninterrupted: every file is written whole or not at all, so nothing is left "
                  "half-written", file=sys.stderr)
        sys.exit(130)
    finally:
        release_folders()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def describe_os_error(e: OSError) -> str:
    """'cannot write out/ckpt.pt: permission denied; ...' from an OSError, in one line."""
    what = e.strerror.lower() if e.strerror else type(e).__name__
    where = f" {e.filename}" if e.filename else ""
    return f"{type(e).__name__} on{where}: {what}; check that the path exists, is writable and has free space"


# ---------------------------------------------------------------------------------------------
# Flags


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows each default that a help text does not
    already state (switches and unset options have none to show)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False \
                or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """A bad flag is reported as every other mistake is: one `error: ...` line, exit status 1."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(1)


def make_parser(doc: str) -> argparse.ArgumentParser:
    return _Parser(description=doc, formatter_class=_HelpFormatter)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def int_at_least(low: int):
    """An argparse type: an integer >= low (a value below cannot work, e.g. KID needs 2 images)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text}")
        return value
    parse.__name__ = f"integer >= {low}"  # how argparse names the type in its own errors
    return parse


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def unit_interval(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def add_common_args(p: argparse.ArgumentParser, out: str, epochs: int, lr: float | None,
                    lr_help: str = "Adam learning rate") -> None:
    """The flags both training scripts take; defaults are shown by --help."""
    p.add_argument("--epochs", type=positive_int, default=epochs, metavar="N",
                   help="passes over the training split")
    p.add_argument("--batch-size", type=positive_int, default=128, metavar="N",
                   help="images per step, over all processes under torchrun (each takes an equal share)")
    p.add_argument("--lr", type=positive_float, default=lr, help=lr_help)
    p.add_argument("--seed", type=int, default=0, help="seeds weights, noise and data order")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="auto picks cuda, then mps, then cpu")
    p.add_argument("--data-root", default="data", metavar="PATH",
                   help="folder holding bloodmnist_64.npz (downloaded there if missing), or the .npz itself")
    p.add_argument("--subset", type=positive_int, default=None, metavar="N",
                   help="train on the first N training images only (a quick check)")
    p.add_argument("--conditional", action="store_true",
                   help="condition the model on the cell type; grids then show one class per row")
    p.add_argument("--eval-every", type=non_negative_int, default=0, metavar="K",
                   help="every K epochs and after the last, log the KID of --eval-n samples against the "
                        "test split (evaluate.py's feature network; trained once if not cached); 0: off")
    p.add_argument("--eval-n", type=int_at_least(2), default=2000, metavar="N", help="samples per --eval-every KID")
    p.add_argument("--feature-cache", default="outputs/features", metavar="DIR",
                   help="where evaluate.py's feature network is cached")
    add_speed_args(p)
    p.add_argument("--out", default=out, metavar="DIR", help="run folder: config, metrics, grids, curves, ckpt.pt")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its ckpt.pt, with that run's settings")


def given_flags(parser: argparse.ArgumentParser, argv=None) -> set[str]:
    """The options typed on the command line (as `dest` names), told apart from those left at
    their defaults even when a typed value equals the default: argparse fills in a default only
    where the namespace it is handed lacks the attribute."""
    unset = object()
    dests = vars(parser.parse_args(argv))
    typed = parser.parse_args(argv, namespace=argparse.Namespace(**{k: unset for k in dests}))
    return {k for k, v in vars(typed).items() if v is not unset}


# Settings a resumed run may change when given; everything else comes from the checkpoint.
# How a run computes (precision, memory format, compilation) may change too: it is not what it learns.
# So may the number of processes, and with it whether BatchNorm statistics are synchronised.
RESUME_MAY_CHANGE = {"epochs", "device", "data_root", "eval_every", "eval_n", "feature_cache",
                     "precision", "channels_last", "compile", "sync_bn"}
# Never taken from the checkpoint: where a run continues is this machine's choice (--device auto
# picks what this machine has), and --out/--resume name the run itself.
THIS_MACHINE = {"device", "out", "resume"}


def same_kind(value, default) -> bool:
    """Whether a saved setting has the kind of value its flag gives (a number for a number, a
    switch for a switch, a list for a list; anything plain where the default is None)."""
    if default is None:
        return value is None or isinstance(value, (int, float, str))
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, (list, tuple) if isinstance(default, (list, tuple)) else type(default))


def start_run(args: argparse.Namespace, parser: argparse.ArgumentParser, kind: str, given: set[str],
              fill_defaults=None) -> dict | None:
    """Check --out and --resume and return the checkpoint to resume from (None for a new run);
    nothing is written yet (claim_run does that, once the data and models are ready).

    A new run refuses a folder that already holds a checkpoint, so no run is overwritten by
    accident. With --resume, the run's own settings are restored into `args`: a flag in `given`
    (typed on the command line) must agree with them unless it is in RESUME_MAY_CHANGE. Then
    `fill_defaults(args)` may fill defaults that depend on other flags.
    """
    out = Path(args.out)
    check_folder(out, "--out")
    if is_main() and out.is_dir():
        lock_folder(out)  # before reading its checkpoint: no other run may be writing it meanwhile
    ckpt_path = out / "ckpt.pt"
    ckpt = None
    if args.resume:
        if not ckpt_path.is_file():
            raise UserError(f"--resume: no checkpoint at {ckpt_path}; start a new run without --resume")
        ckpt = load_checkpoint(ckpt_path, kind, training=True)
        saved, defaults = ckpt["args"], vars(parser.parse_args([]))
        for key, value in vars(args).items():
            if key in THIS_MACHINE or key not in saved:
                continue
            if not same_kind(saved[key], defaults[key]):
                raise UserError(f"{ckpt_path} is not a checkpoint of this repo (its setting {key} is "
                                f"{saved[key]!r}); was it written by train_{kind}.py?")
            if key not in given:
                setattr(args, key, saved[key])
            elif key not in RESUME_MAY_CHANGE and value != saved[key]:
                raise UserError(f"--resume keeps the run's own settings, but --{key.replace('_', '-')} "
                                f"{value} differs from its {saved[key]}; drop the flag, or start a "
                                "new run with another --out")
        if ckpt["epoch"] >= args.epochs:
            raise UserError(f"{ckpt_path} has already trained {ckpt['epoch']} epochs; pass "
                            f"--epochs N with N > {ckpt['epoch']} to train longer")
    elif ckpt_path.exists():
        raise UserError(f"{out} already holds a run ({ckpt_path}); pass --resume to continue it, "
                        "or choose another --out")
    if fill_defaults is not None:
        fill_defaults(args)
    return ckpt


def claim_run(args: argparse.Namespace, ckpt: dict | None) -> None:
    """The run has really started (its data, models and checkpoint are loaded): make --out, hold
    its lock for the rest of the process, and write config.json. Rank 0 alone writes."""
    if not is_main():
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lock_folder(out)
    if ckpt is None and (out / "ckpt.pt").exists():  # another run got there first, and has finished
        raise UserError(f"{out} already holds a run ({out / 'ckpt.pt'}); pass --resume to continue it, "
                        "or choose another --out")
    if ckpt is not None:
        print(f"Resuming {out / 'ckpt.pt'} at epoch {ckpt['epoch'] + 1}, step {ckpt['step']}")
    atomic_write_text(out / "config.json", json.dumps(vars(args), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Seeds, devices, random states


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)  # seeds the CPU and every CUDA/MPS device


def pick_device(name: str = "auto") -> torch.device:
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this PyTorch sees no CUDA GPU; use --device auto or cpu")
    elif name == "mps" and not mps:
        raise UserError("--device mps: Apple's MPS backend is not available here; use --device auto or cpu")
    return torch.device(name)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """How the training scripts and bench.py compute; none of these changes what a model learns
    beyond rounding (README, "Speed")."""
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="autocast dtype of the forward passes (weights and optimiser stay fp32): auto is "
                        "bf16 where the hardware computes it natively (recent NVIDIA GPUs, CPUs with "
                        "AVX512-BF16 or AMX), else fp32; fp16 adds a gradient scaler")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="keep images and convolution weights in channels-last (NHWC) memory format")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the networks (pays on GPUs; slower on the 2-core CPU we measured)")


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPUs on which bf16 matrix products are native, not emulated."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """--precision as a dtype for this device; 'auto' picks bf16 only where it is native."""
    if name == "auto":
        native = (torch.cuda.is_bf16_supported() if device.type == "cuda" else
                  cpu_has_bf16() if device.type == "cpu" else False)
        return torch.bfloat16 if native else torch.float32
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU has no bf16; use --precision fp16 or auto")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


class Precision:
    """Mixed precision for one run: autocast() around forward passes and losses, and for fp16 a
    gradient scaler per optimiser (fp16 gradients underflow without one; bf16 has fp32's range)."""

    def __init__(self, name: str, device: torch.device):
        self.device, self.dtype = device, resolve_precision(name, device)
        self.name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self):
        if self.dtype == torch.float32:  # no autocast at all (older PyTorch has none for MPS)
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self):
        """A GradScaler for fp16, else None."""
        return torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler=None, inputs=None) -> None:
    """loss.backward() and optimizer.step(), through the fp16 scaler when there is one. `inputs`
    limits the backward pass to those tensors' gradients (e.g. G's weights only, so D's weight
    gradients, which G's step would throw away, are never computed)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward(inputs=inputs)
        optimizer.step()
    else:
        scaler.scale(loss).backward(inputs=inputs)
        scaler.step(optimizer)
        scaler.update()


def adam(params, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam with fused=True (one kernel for all parameters) where this PyTorch has it for the
    parameters' device (CUDA, and CPU and MPS in recent versions), else the default."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=lr, betas=betas)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def compiled(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """torch.compile(module) when enabled. The compiled wrapper shares the module's parameters;
    keep saving and averaging the module itself (the wrapper's state_dict keys differ)."""
    return torch.compile(module) if enabled else module


def keep_freed_memory() -> None:
    """On Linux (glibc), keep freed memory in the process instead of handing it back to the system.

    Each training step frees and re-allocates the same activation buffers, tens of MB each. By
    default glibc serves such blocks with mmap and returns them on free, so the next step pays a
    page fault per 4 KB to get them back: a fifth of a GAN or VAE step on the 2-core CPU we
    measured (bench.py). PyTorch's GPU allocator caches blocks for the same reason; this is the
    CPU's equivalent. Elsewhere (macOS, Windows, musl) it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt(M_MMAP_MAX, 0)  # serve every block from the heap, which free() keeps
    mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)  # and never shrink the heap


def speed_up(device: torch.device) -> None:
    """Process-wide settings that make the same computation faster: freed CPU memory is kept
    (above), and on NVIDIA GPUs cuDNN times its convolution algorithms once for our fixed shapes
    and keeps the fastest."""
    keep_freed_memory()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what rng_state saved; a device state from another kind of device is skipped."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def fixed_noise(n: int, dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """The latent batch every epoch's sample grid is drawn from: the same on every device."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)).to(device)


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun)
#
# Under torchrun every process runs the whole script on its own device (one GPU per process, or
# CPU), holds the whole dataset, and trains on its own equal share of every global batch;
# DistributedDataParallel averages the gradients, so the weights stay identical everywhere. The
# random numbers of a step are drawn for the global batch on every process, each taking its own
# rows (batch_noise), so N processes compute what one process computes on the whole batch. Rank
# 0 alone writes files and prints. In a plain run, this process is rank 0 of 1 and nothing here
# initialises anything.


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
    device = pick_device(args.device)
    if not launched_by_torchrun():
        return device
    n = world_size()
    if args.batch_size % n:
        below, above = args.batch_size // n * n, (args.batch_size // n + 1) * n
        raise UserError(f"--batch-size {args.batch_size} is the global batch, shared by {n} processes, "
                        f"and does not divide by {n}; use a multiple of {n} such as "
                        f"{above if below == 0 else f'{below} or {above}'}")
    if device.type == "mps":
        raise UserError("torchrun cannot use Apple's MPS GPU (PyTorch has no process group for it); "
                        "pass --device cpu")
    if device.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise UserError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this "
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
            raise UserError("rank 0 failed to prepare the run (see its error); stopping")
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
    # PyTorch 2.15 renamed the switch (the new one still syncs once at the start, which is harmless)
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
    flat = torch.cat([b.flatten() for b in buffers])
    torch.distributed.all_reduce(flat)
    flat /= world_size()
    for b, v in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(v.view_as(b))


def batch_noise(draw, local_batch: int, *shape: int, device: torch.device) -> torch.Tensor:
    """draw(B, *shape) (torch.randn, torch.rand) for the global batch B = local_batch x
    processes, of which this process keeps its own rows, as it keeps its own rows of the
    images. Every process draws the same numbers from the same seed, so the run's randomness,
    its random state and its results do not depend on how many processes share the batch."""
    noise = draw(local_batch * world_size(), *shape, device=device)
    return noise[rank() * local_batch:(rank() + 1) * local_batch]


def batch_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of t over the global batch (no gradient): the mean over processes of each
    process's mean, since every process holds an equal share."""
    m = t.detach().mean()
    if world_size() > 1:
        torch.distributed.all_reduce(m)
        m /= world_size()
    return m


# ---------------------------------------------------------------------------------------------
# Files


@contextlib.contextmanager
def atomic_write(path: Path):
    """Yields a temporary path beside `path` to write; when the block succeeds it replaces `path`
    in one rename, when it fails it is removed. Readers never see a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def check_folder(folder: Path, flag: str, fix: str | None = None) -> None:
    """Refuse, before any work, a folder that cannot be made or written: a file stands at its
    place or above it, or the nearest existing folder above it is read-only. `fix` says what to
    do (default: choose another `flag`)."""
    folder, fix = Path(folder), fix or f"choose another {flag}"
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file, not a folder; {fix}")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, not a folder; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {folder}: cannot write into {existing} (read-only); {fix}")


def is_precious(path: Path) -> bool:
    """A checkpoint or a dataset, which no output may replace: a zip archive (torch.save and
    np.savez both write one) holding a pickled state or MedMNIST arrays, unless it is a
    synthetic set that sample.py wrote (and marked)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    checkpoint = any(n.endswith("data.pkl") for n in names)
    dataset = any(n.endswith("_images.npy") for n in names) and SYNTHETIC_MARK + ".npy" not in names
    return checkpoint or dataset


SYNTHETIC_MARK = "synthetic_source"  # the npz key that marks sample.py's exports


def check_output(path: str | os.PathLike, flag: str, suffixes: tuple[str, ...], overwrite: bool,
                 inputs: tuple = ()) -> Path:
    """Refuse, before any work, an output file that cannot or should not be written: a name
    without one of `suffixes`, a folder, a place under a file or in a read-only folder, one of
    the command's `inputs`, a checkpoint or a dataset; an existing file only with `overwrite`
    (the caller then says that it replaced it). Missing folders are made when writing."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{flag} {path}: name a {' or '.join(suffixes)} file")
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; name a file in it, such as {path / ('out' + suffixes[0])}")
    check_folder(path.parent, flag)
    if path.exists():
        if any(Path(i).exists() and path.samefile(i) for i in inputs):
            raise UserError(f"{flag} {path} is an input of this command; choose another name")
        if is_precious(path):
            raise UserError(f"{flag} {path} is a checkpoint or a dataset, which an output never "
                            "replaces; choose another name")
        if not overwrite:
            raise UserError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose "
                            "another name")
    return path


def replaced_note(path: Path) -> str:
    """' (replaced the earlier one)' when `path` exists: said when an output replaces a file."""
    return " (replaced the earlier one)" if Path(path).exists() else ""


_locks = {}  # folder -> open descriptor holding its lock, for the life of the process


def lock_folder(folder: Path) -> None:
    """Hold an exclusive lock on a run folder until this process ends, so that no second run
    writes into it meanwhile. The operating system drops the lock when the process ends, however
    it ends, so a crashed run leaves nothing stuck. On POSIX the folder itself is locked (flock)
    and nothing is written into it; on Windows a `.lock` file in it is."""
    key = Path(folder).resolve()
    if key in _locks:
        return
    try:
        import fcntl
        fd = os.open(key, os.O_RDONLY)
        lock = lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        import msvcrt
        fd = os.open(key / ".lock", os.O_RDWR | os.O_CREAT)
        lock = lambda: msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    try:
        lock()
    except OSError:
        os.close(fd)
        raise UserError(f"another run is writing to {folder}; wait for it to end, or choose another "
                        "--out") from None
    _locks[key] = fd


def release_folders() -> None:
    for fd in _locks.values():
        os.close(fd)
    _locks.clear()


def save_checkpoint(path: Path, state: dict) -> None:
    """A crash while saving never leaves a half-written ckpt.pt: the old one stays."""
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


KINDS = ("gan", "vae")
# What every checkpoint holds, and what resuming a training run needs besides.
CHECKPOINT_KEYS = {"kind": str, "args": dict, "epoch": int, "step": int, "models": dict}
TRAINING_KEYS = {"optimizers": dict, "scalers": dict, "meter": dict, "rng": dict}


def load_checkpoint(path: str | os.PathLike, kind: str | None = None,
                    map_location: str | torch.device = "cpu", training: bool = False) -> dict:
    """Load a checkpoint written by save_training_state and check its layout; kind ("gan" or
    "vae") checks its origin, training that it holds what resuming needs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); it may be "
                        "truncated or not from this repo") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by train_gan.py or train_vae.py")
    wanted = {**CHECKPOINT_KEYS, **(TRAINING_KEYS if training else {})}
    wrong = [k for k, t in wanted.items() if not isinstance(ckpt.get(k), t)]
    if wrong or ckpt["kind"] not in KINDS:
        what = f"its {wrong[0]!r} is missing or not a {wanted[wrong[0]].__name__}" if wrong else \
            f"unknown kind {ckpt['kind']!r}"
        raise UserError(f"{path} is not a checkpoint of this repo ({what}); was it written by "
                        "train_gan.py or train_vae.py?")
    if kind is not None and ckpt["kind"] != kind:
        raise UserError(f"{path} was written by train_{ckpt['kind']}.py, not train_{kind}.py")
    return ckpt


class MetricsLog:
    """One JSON line per epoch in `path`. On resume, lines past the checkpoint's epoch (written
    after its last save) are dropped, so the log always matches the weights; so is a damaged line
    (a crash or a full disk while logging), with a warning: the log never blocks the checkpoint."""

    def __init__(self, path: Path, keep_epochs: int = 0):
        self.path = path
        self.records = []
        if keep_epochs and path.is_file():
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                try:
                    record = json.loads(line)
                    if record["epoch"] <= keep_epochs:
                        self.records.append(record)
                except (ValueError, TypeError, KeyError):
                    warn(f"{path}: line {number} is damaged and is dropped")
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------
# Training-loop helpers


class Meter:
    """Running means of scalar tensors, each over the steps that reported it. Values stay on the
    device until read, so logging does not stall the GPU every step. Under torchrun the means
    are over all processes (every process must read them at the same point)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def update(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def _sums(self) -> dict[str, float]:
        """The sums averaged over the processes (every process has taken the same steps)."""
        if not self.sums:
            return {}
        flat = torch.stack(list(self.sums.values()))
        if world_size() > 1:
            torch.distributed.all_reduce(flat)
            flat /= world_size()
        return dict(zip(self.sums, flat.tolist()))  # one wait for the device, not one per value

    def means(self) -> dict[str, float]:
        return {k: v / self.counts[k] for k, v in self._sums().items()}

    def state_dict(self) -> dict:
        """Averaged over processes, so a run resumes with any number of them."""
        return {"sums": self._sums(), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.sums = {k: torch.tensor(v, device=device) for k, v in state["sums"].items()}
        self.counts = dict(state["counts"])


def ema_decay(decay: float, updates: int) -> float:
    """The decay for update number `updates` (0-based), warmed up as min(decay, (1 + t) / (10 + t))
    (TensorFlow's ExponentialMovingAverage): early on the average follows the model instead of
    keeping the random initial weights (0.999 ** 2000 still leaves 14 % of them)."""
    return min(decay, (1 + updates) / (10 + updates))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for the weights and the floating-point buffers
    (BatchNorm running statistics); integer buffers (batch counters) are copied."""
    pairs = list(zip(ema.state_dict().values(), model.state_dict().values()))
    floats = [(e, m) for e, m in pairs if e.dtype.is_floating_point]
    torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1.0 - decay)  # one launch, not one per tensor
    for e, m in pairs:
        if not e.dtype.is_floating_point:
            e.copy_(m)


@torch.no_grad()
def recalibrate_batchnorm(module: torch.nn.Module, inputs) -> None:
    """Set every BatchNorm's running statistics to their average over the batches `inputs`
    (argument tuples), computed in training mode ("precise BatchNorm", Wu & Johnson 2021). A
    generator drawn in eval mode then normalises as it did in training, after a few steps as well
    as after many, and an averaged (EMA) generator gets statistics of its own weights instead of
    the average of the raw generator's. Weights and random state are untouched."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not norms:
        return
    momenta, was_training = [m.momentum for m in norms], module.training
    module.train()
    for k, args in enumerate(inputs, 1):
        for m in norms:
            m.momentum = 1.0 / k  # running <- running + (batch - running) / k: the mean over k batches
        module(*args)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    module.train(was_training)


def save_training_state(path: Path, kind: str, args: argparse.Namespace, epoch: int, step: int,
                        models: dict, optimizers: dict, meter: "Meter", device: torch.device,
                        scalers: dict | None = None) -> None:
    """One dict that resumes a run exactly: the networks, their optimisers (and fp16 gradient
    scalers), where the run stands (`epoch` finished epochs and `step` steps into the next), its
    settings and random states. Under torchrun every process calls this (the running means are
    averaged over them) and rank 0 writes: the processes hold identical weights and random
    states, so the file resumes with any number of processes."""
    meter_state = meter.state_dict()
    if not is_main():
        return
    save_checkpoint(path, {
        "kind": kind, "args": vars(args), "epoch": epoch, "step": step,
        "models": {k: m.state_dict() for k, m in models.items()},
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "scalers": {k: s.state_dict() for k, s in (scalers or {}).items() if s is not None},
        "meter": meter_state, "rng": rng_state(device)})


@contextlib.contextmanager
def from_checkpoint(path: Path | None):
    """Around code that builds or loads models from a checkpoint's contents: an error there means
    the file does not fit this repo (another version, or crafted), so it becomes one line that
    names the file. With path None (a new run) errors pass through."""
    try:
        yield
    except (KeyError, IndexError, RuntimeError, ValueError, TypeError, AttributeError) as e:
        if path is None:
            raise
        raise UserError(f"{path} does not match this repo's models ({type(e).__name__}); was it "
                        "written by another version?") from None


def restore_training_state(ckpt: dict, models: dict, optimizers: dict, meter: "Meter",
                           device: torch.device, scalers: dict | None = None) -> tuple[int, int]:
    """Load what save_training_state wrote into live objects (inside from_checkpoint); returns
    (epoch, step)."""
    for k, m in models.items():
        m.load_state_dict(ckpt["models"][k])
    for k, o in optimizers.items():
        # the saved param groups carry how the saving machine stepped (fused or not); keep ours
        how = [{f: g[f] for f in ("fused", "foreach") if f in g} for g in o.param_groups]
        o.load_state_dict(ckpt["optimizers"][k])
        for g, h in zip(o.param_groups, how):
            g.update(h)
    for k, s in (scalers or {}).items():
        if s is not None and k in ckpt["scalers"]:
            s.load_state_dict(ckpt["scalers"][k])
    meter.load_state_dict(ckpt["meter"], device)
    set_rng_state(ckpt["rng"], device)
    return ckpt["epoch"], ckpt["step"]


def epoch_bar(batches, epoch: int, start: int, epochs: int) -> tqdm:
    """The batches of one epoch from step `start` on, behind a progress bar (rank 0's only)."""
    return tqdm(batches.epoch(epoch, start=start), total=len(batches), initial=start,
                desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True, disable=not is_main())


SYNC_EVERY = 10  # steps between reads of the running means (and, under torchrun, stop checks)


def show_progress(bar: tqdm, meter: "Meter", epoch: int, step: int, ckpt_path: Path,
                  force: bool = False) -> None:
    """Every SYNC_EVERY steps, at the epoch's last and when forced (before a checkpoint): read
    the running means (this waits for the device), stop the run if one is not finite, show them."""
    if force or step % SYNC_EVERY == 0 or step == bar.total:
        means = meter.means()
        check_finite(means, epoch, step, ckpt_path)
        bar.set_postfix(format_stats(means))


def check_finite(means: dict[str, float], epoch: int, step: int, ckpt_path: Path) -> None:
    bad = [k for k, v in means.items() if not math.isfinite(v)]
    if bad:
        kept = f"the last good checkpoint is kept at {ckpt_path}" if ckpt_path.exists() else \
            "no checkpoint had been written yet"
        raise UserError(f"{bad[0]} became {means[bad[0]]} in epoch {epoch + 1} near step {step}: "
                        f"training diverged; {kept}. Try a lower --lr or another --seed")


class GracefulStop:
    """Ctrl-C (or SIGTERM from a cluster) sets `requested`; the loop finishes its step, saves a
    checkpoint and exits. A second Ctrl-C stops at once.

    Under torchrun (which passes a Ctrl-C on to every process as SIGINT, and kills them 30 s
    later) the processes agree on when to stop, so all stop after the same step: on CPUs after
    every step, on GPUs every SYNC_EVERY steps (reading the agreed flag waits for the GPU)."""

    def __enter__(self):
        self.requested = False
        gpus = world_size() > 1 and torch.distributed.get_backend() == "nccl"
        self.every = SYNC_EVERY if gpus else 1
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if is_main():
            when = "this step" if self.every == 1 else f"at most {self.every} steps"
            print(f"\nStopping after {when} to save a checkpoint (Ctrl-C again to quit at once)",
                  file=sys.stderr)

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        return False

    def due(self, step: int, last: int) -> bool:
        """Between steps (step `last` ends the epoch): whether to stop now, the same answer on
        every process (in one process, self.every is 1 and any_process is the flag itself)."""
        return (step % self.every == 0 or step == last) and any_process(self.requested)

    def save_and_exit(self, bar: tqdm, save, epoch: int, step: int, ckpt_path: Path) -> None:
        """save(epoch, step) and exit with status 130, once rank 0 has written the checkpoint."""
        bar.close()
        save(epoch, step)
        barrier()  # no process exits (and gets its siblings killed by torchrun) before the file is written
        if is_main():
            print(f"Interrupted in epoch {epoch + 1} after step {step}; checkpoint saved to {ckpt_path}. "
                  "Continue with the same command plus --resume.", file=sys.stderr)
        sys.exit(130)  # the shell's convention for a run ended by Ctrl-C


def format_stats(means: dict[str, float]) -> dict[str, str]:
    return {k: f"{v:.4g}" for k, v in means.items()}


# ---------------------------------------------------------------------------------------------
# Pictures


def save_figure(path: Path, write) -> None:
    """write(file, format) into a temporary file that then replaces `path` (making its folder):
    a crash never leaves half a picture. The format follows the name (png, jpg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        write(tmp, path.suffix.lstrip(".").lower().replace("jpg", "jpeg"))


PICTURES = (".png", ".jpg", ".jpeg")  # what save_grid and the figures write


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, row_labels: list[str] | None = None) -> None:
    """images (B, C, H, W) in [0, 1] -> one picture, `nrow` images a row, 2-pixel gaps.
    With row_labels, each row is labelled on the left (a class per row)."""
    from torchvision.utils import make_grid, save_image
    images = images.detach().float().clamp(0, 1).cpu()
    if row_labels is None:
        save_figure(path, lambda f, fmt: save_image(images, f, nrow=nrow, padding=2, pad_value=1.0, format=fmt))
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0).permute(1, 2, 0).numpy()
    h, w = grid.shape[:2]
    fig = plt.figure(figsize=(w / 100 + 1.9, h / 100), dpi=100)
    ax = fig.add_axes([1.9 / (w / 100 + 1.9), 0, 1 - 1.9 / (w / 100 + 1.9), 1])
    ax.imshow(grid, interpolation="nearest")
    row_h = (h - 2) / len(row_labels)
    ax.set_yticks([2 + row_h * (i + 0.5) for i in range(len(row_labels))], row_labels, fontsize=10)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    save_figure(path, lambda f, fmt: fig.savefig(f, dpi=100, format=fmt))
    plt.close(fig)


def plot_curves(records: list[dict], path: Path, panels: list[tuple[str, list[str], float | None]]) -> None:
    """One panel per (title, metric keys, optional horizontal reference line), against epoch;
    panels with none of their keys in the records are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [p for p in panels if any(k in r for k in p[1] for r in records)]  # e.g. no KID logged
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys, hline) in zip(axes[0], panels):
        for k in keys:
            logged = [r for r in records if k in r]  # e.g. KID only every --eval-every epochs
            if logged:
                ax.plot([r["epoch"] for r in logged], [r[k] for r in logged], marker=".", label=k)
        if hline is not None:
            ax.axhline(hline, color="gray", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(path, lambda f, fmt: fig.savefig(f, dpi=100, format=fmt))
    plt.close(fig)
