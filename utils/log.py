"""What a run shows and keeps of its numbers: running means of the step's scalars (Meter), the
progress bar with them and the stop on a number that is not finite, and metrics.jsonl (MetricsLog)."""
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from system import distributed, errors, files


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


def format_stats(means: dict[str, float]) -> dict[str, str]:
    return {k: f"{v:.4g}" for k, v in means.items()}


def epoch_bar(batches, epoch: int, start: int, epochs: int) -> tqdm:
    """The batches of one epoch from step `start` on, behind a progress bar (rank 0's only)."""
    return tqdm(batches.epoch(epoch, start=start), total=len(batches), initial=start,
                desc=f"epoch {epoch + 1}/{epochs}", dynamic_ncols=True, disable=not distributed.is_main())


SYNC_EVERY = 10  # steps between reads of the running means (and, under torchrun, stop checks)


def show_progress(bar: tqdm, meter: Meter, epoch: int, step: int, ckpt_path: Path, force: bool = False) -> None:
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


BALANCE_EPOCHS = 3  # epochs in a row that a discriminator must be out of balance before a run says so


def balance(records: list[dict], real: str, fake: str, chance: float, over: float) -> tuple[str, str] | None:
    """("chance" or "overpowered", a line that says so and what to try) when a GAN's D has been
    out of balance with G in each of the last BALANCE_EPOCHS epochs of `records`: its mean score
    of real images (the key `real`) minus that of generated ones (`fake`) below `chance`, or above
    `over`; None otherwise."""
    last = records[-BALANCE_EPOCHS:]
    if len(last) < BALANCE_EPOCHS or any(real not in r for r in last):
        return None
    gaps = [r[real] - r[fake] for r in last]
    scores = f"{real} {last[-1][real]:.2f}, {fake} {last[-1][fake]:.2f}"
    if all(gap < chance for gap in gaps):
        return "chance", (f"D has told real from generated images no better than chance for {BALANCE_EPOCHS} "
                          f"epochs ({scores}), and may have stopped teaching G; if the grids stall, try "
                          "--recipe paper")
    if all(gap > over for gap in gaps):
        return "overpowered", (f"D has overpowered G for {BALANCE_EPOCHS} epochs ({scores}), and G may collapse; "
                               "--keep-every 5 keeps epochs to sample from, or try --r1 1 or --lecam 0.01")
    return None


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
                    errors.warn(f"{path}: line {number} is damaged and is dropped")
        files.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        """Appends one line; a refused write is one line of error, and a torn last line is dropped
        on resume (above)."""
        self.records.append(record)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            if not files.is_write_error(e):
                raise
            raise files.refused(self.path, e, "the checkpoint of the last epoch is as it was") from None
