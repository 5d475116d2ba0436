"""What the two training loops share: seeds and fixed noise, running means, the EMA and
BatchNorm re-estimation, the progress bar, the NaN stop and Ctrl-C."""
import math
import signal
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from utils import distributed, errors


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)  # seeds the CPU and every CUDA/MPS device


def fixed_noise(n: int, dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """The latent batch every epoch's sample grid is drawn from: the same on every device."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)).to(device)


def learning_rate(base: float, schedule: str, index: int, total: int) -> float:
    """The learning rate of step `index` (counted from 1) of a run of `total` steps: `base` all
    along ("constant"), or falling from `base` to 0 along a half cosine ("cosine"). A function of
    the step alone, so a resumed run needs no state for it."""
    if schedule == "constant":
        return base
    return base * 0.5 * (1 + math.cos(math.pi * (index - 1) / total))


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
        sums = torch.stack(list(self.sums.values()))
        if distributed.world_size() > 1:
            torch.distributed.all_reduce(sums)
            sums /= distributed.world_size()
        return dict(zip(self.sums, sums.tolist()))  # one wait for the device, not one per value

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


def epoch_bar(batches, epoch: int, start: int, epochs: int) -> tqdm:
    """The batches of one epoch from step `start` on, behind a progress bar (rank 0's only)."""
    return tqdm(batches.epoch(epoch, start=start), total=len(batches), initial=start,
                desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True, disable=not distributed.is_main())


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
        raise errors.UserError(f"{bad[0]} became {means[bad[0]]} in epoch {epoch + 1} near step {step}: "
                               f"training diverged; {kept}. Try a lower --lr or another --seed")


class GracefulStop:
    """Ctrl-C (or SIGTERM from a cluster) sets `requested`; the loop finishes its step, saves a
    checkpoint and exits. A second Ctrl-C stops at once.

    Under torchrun (which passes a Ctrl-C on to every process as SIGINT, and kills them 30 s
    later) the processes agree on when to stop, so all stop after the same step: on CPUs after
    every step, on GPUs every SYNC_EVERY steps (reading the agreed flag waits for the GPU)."""

    def __enter__(self):
        self.requested = False
        gpus = distributed.world_size() > 1 and torch.distributed.get_backend() == "nccl"
        self.every = SYNC_EVERY if gpus else 1
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if distributed.is_main():
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
        return (step % self.every == 0 or step == last) and distributed.any_process(self.requested)

    def save_and_exit(self, bar: tqdm, save, epoch: int, step: int, ckpt_path: Path) -> None:
        """save(epoch, step) and exit with status 130, once rank 0 has written the checkpoint."""
        bar.close()
        save(epoch, step)
        distributed.barrier()  # no process exits (and gets its siblings killed by torchrun) before the file is written
        if distributed.is_main():
            print(f"Interrupted in epoch {epoch + 1} after step {step}; checkpoint saved to {ckpt_path}. "
                  "Continue with the same command plus --resume.", file=sys.stderr)
        sys.exit(130)  # the shell's convention for a run ended by Ctrl-C


def format_stats(means: dict[str, float]) -> dict[str, str]:
    return {k: f"{v:.4g}" for k, v in means.items()}
