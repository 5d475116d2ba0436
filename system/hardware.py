"""Where and how a run computes: the device, mixed precision, memory format, fused Adam and
torch.compile. None of these changes what a model learns beyond rounding (docs/speed.md)."""
import contextlib
import ctypes
import platform
import sys

import torch

from system import errors


def pick_device(name: str = "auto") -> torch.device:
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise errors.UserError("--device cuda: this PyTorch sees no CUDA GPU; use --device auto or cpu")
    elif name == "mps" and not mps:
        raise errors.UserError("--device mps: Apple's MPS backend is not available here; use --device auto or cpu")
    return torch.device(name)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
        raise errors.UserError("--precision bf16: this GPU has no bf16; use --precision fp16 or auto")
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
    page fault per 4 KB to get them back, a large share of a CPU step (docs/speed.md measures
    it with bench.py). PyTorch's GPU allocator caches blocks for the same reason; this is the
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


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the threads torch uses (for benchmarks)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {torch.get_num_threads()} threads"
