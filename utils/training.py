"""One training run, as both training scripts drive it: the device and seed, the training data,
restoring a resumed run's state, the metrics log, and the epochs with their progress bar, NaN stop
and Ctrl-C. Each script owns its settings, networks, step and pictures:

    args, ckpt = parse_args(argv)                   # flags, --resume's settings, the recipe's defaults
    run = Run(args, "gan", ckpt, VALUE_RANGE)       # device, seed, data; nothing written yet
    trainer = GANTrainer(args, run.networks(), run.device)
    run.start(*trainer.state())                     # a resumed run's state restored; --out claimed
    try:
        for epoch in run.epochs():
            for index, (x, y) in run.steps(epoch):
                trainer.step(x, y, index, run.meter)
            record = run.epoch_record(epoch)        # then the script's pictures, run.log.write(record)
            run.save(epoch + 1)
    except Interrupted as stop:                     # Ctrl-C, between two steps (system/errors.py)
        run.save(stop.epoch, stop.step)
        raise
"""
import argparse
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from data import Batches, Dataset, load, locate, md5
from system import distributed, errors, files, hardware
from utils import checkpoint, log, resume
from system.errors import Interrupted


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)  # seeds the CPU and every CUDA/MPS device


def learning_rate(base: float, schedule: str, index: int, total: int) -> float:
    """The learning rate of step `index` (counted from 1) of a run of `total` steps: `base` all
    along ("constant"), or falling from `base` to 0 along a half cosine ("cosine"). A function of
    the step alone, so a resumed run needs no state for it."""
    if schedule == "constant":
        return base
    return base * 0.5 * (1 + math.cos(math.pi * (index - 1) / total))


def same_data(data: Dataset, data_root: str, ckpt: dict | None) -> str:
    """The MD5 of the data file a run reads, which config.json and the checkpoint record; a resumed
    run refuses a file with other contents than the one it trained on (the same file moved is fine)."""
    path = locate(data, data_root, download=False)
    digest = md5(path)
    trained_on = ckpt["args"].get("data_md5") if ckpt else None
    if trained_on and trained_on != digest:
        raise errors.UserError(f"--resume: {path} has MD5 {digest}, but this run trained on a file with MD5 "
                               f"{trained_on}; point --data-root at the file it trained on, or start a new run")
    return digest


class Run:
    """The device, seed and training data of a run whose settings are final (`ckpt`: the
    checkpoint it resumes, or None); nothing is written until start()."""

    def __init__(self, args: argparse.Namespace, kind: str, ckpt: dict | None, value_range: tuple[float, float],
                 splits: tuple[str, ...] = ("train",)):
        self.args, self.kind, self.ckpt = args, kind, ckpt
        self.data = Dataset(args.dataset, args.size)
        self.out = Path(args.out)
        self.ckpt_path = self.out / "ckpt.pt"
        self.device = distributed.init_distributed(args)  # and joins the other processes under torchrun
        hardware.speed_up(self.device)
        set_seed(args.seed)
        with distributed.main_first():  # only rank 0 may download; the others then read its file
            self.splits = load(self.data, args.data_root, splits=splits, subset=args.subset,
                               download=distributed.is_main())
        args.subset = args.subset and len(self.splits["train"])  # the number used, for config.json
        args.data_md5 = same_data(self.data, args.data_root, ckpt)
        self.batches = Batches(self.splits["train"], args.batch_size, self.device, value_range, seed=args.seed,
                               channels_last=args.channels_last, rank=distributed.rank(),
                               world_size=distributed.world_size())
        self.meter = log.Meter()
        self.epoch, self.step = 0, 0  # finished epochs, and steps into the next

    def networks(self) -> dict[str, torch.nn.Module]:
        """The run's networks, new (a resumed run's state comes in start()); a resumed run's
        settings come from its file, so an error building them is that file's, in one line."""
        with checkpoint.from_checkpoint(self.ckpt_path if self.ckpt is not None else None):
            return checkpoint.networks(self.kind, vars(self.args), self.data)

    def start(self, models: dict, optimizers: dict, scalers: dict) -> None:
        """Networks, optimisers and scalers by their checkpoint names; with --resume their state,
        the random streams and the running means are restored. Then the run claims --out: it makes
        the folder, locks it, writes config.json and opens metrics.jsonl."""
        self.models, self.optimizers, self.scalers = models, optimizers, scalers
        if self.ckpt is not None:
            with checkpoint.from_checkpoint(self.ckpt_path):
                self.epoch, self.step = checkpoint.restore_training_state(
                    self.ckpt, models, optimizers, self.meter, self.device, scalers)
        resume.claim(self.args, self.ckpt)  # nothing in --out has changed before this line
        self.log = log.MetricsLog(self.out / "metrics.jsonl", keep_epochs=self.epoch) if distributed.is_main() else None

    def epochs(self):
        """The epochs still to train; meanwhile Ctrl-C (or SIGTERM) asks for a stop (GracefulStop)."""
        with GracefulStop() as self.stop:
            for epoch in range(self.epoch, self.args.epochs):
                self.started = time.time()
                yield epoch

    def steps(self, epoch: int):
        """(index, batch) for each step of `epoch` still to take, behind a progress bar; index
        counts the run's batches from 1. After each step the running means are shown and checked
        every few steps; a requested stop raises Interrupted."""
        bar = log.epoch_bar(self.batches, epoch, self.step, self.args.epochs)
        for self.step, batch in enumerate(bar, start=self.step + 1):
            yield epoch * len(self.batches) + self.step, batch
            stopping = self.stop.due(self.step, len(self.batches))
            log.show_progress(bar, self.meter, epoch, self.step, self.ckpt_path, force=stopping)
            if stopping:
                bar.close()
                raise Interrupted(epoch, self.step, self.ckpt_path)
        bar.close()
        self.step = 0

    def epoch_record(self, epoch: int) -> dict:
        """The log record of `epoch` (0-based): the running means of its steps, which a fresh
        meter then replaces. Every process must call this (under torchrun the means are averaged)."""
        record = {"epoch": epoch + 1, **self.meter.means()}
        self.meter = log.Meter()
        return record

    def seconds(self) -> float:
        """Since the start of this epoch."""
        return round(time.time() - self.started, 2)

    def save(self, epoch: int, step: int = 0) -> None:
        """The checkpoint after `epoch` finished epochs and `step` steps into the next; after every
        --keep-every-th epoch a copy of it stays as ckpt_epoch_NNN.pt, so that a model a later
        epoch spoils (a GAN can collapse late) is still there to sample, score or resume."""
        checkpoint.save_training_state(self.ckpt_path, self.kind, self.args, epoch, step, self.models,
                                       self.optimizers, self.meter, self.device, self.scalers)
        every = self.args.keep_every
        if step == 0 and every and epoch % every == 0 and distributed.is_main():
            with files.atomic_write(self.out / f"ckpt_epoch_{epoch:03d}.pt") as tmp:
                shutil.copyfile(self.ckpt_path, tmp)


class GracefulStop:
    """Ctrl-C (or SIGTERM from a cluster) sets `requested`; the loop finishes its step and raises
    Interrupted, and the script saves a checkpoint. A second Ctrl-C stops at once.

    Under torchrun (which passes a Ctrl-C on to every process as SIGINT, and kills them 30 s
    later) the processes agree on when to stop, so all stop after the same step: on CPUs after
    every step, on GPUs every SYNC_EVERY steps (reading the agreed flag waits for the GPU)."""

    def __enter__(self):
        self.requested = False
        gpus = distributed.world_size() > 1 and torch.distributed.get_backend() == "nccl"
        self.every = log.SYNC_EVERY if gpus else 1
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
