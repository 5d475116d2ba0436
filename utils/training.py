"""One training run, as both training scripts drive it: the run folder (a new run, or --resume
with the run's own settings), the device and seed, the training data, restoring the checkpoint,
the metrics log, and the epochs with their progress bar, NaN stop and Ctrl-C. What is a script's
own stays in the script: its models, its step and its pictures.

    run = Run(parser, argv, "gan", VALUE_RANGE)   # checks flags and --out; nothing written yet
    trainer = run.build(GANTrainer, latent_dim)   # models, restored state; now --out is claimed
    for epoch in run.epochs():
        for index, (x, y) in run.steps(epoch):
            trainer.step(x, y, run.meter)
        record = run.epoch_record(epoch)          # then the script's pictures, run.log.write(record)
        run.save(epoch + 1)
"""
import argparse
import json
import shutil
import time
from pathlib import Path

from utils import checkpoint, cli, distributed, errors, files, hardware, loop
from evaluation import metrics
from data import Batches, Dataset, dataset_of, load


class Run:
    """Parse the flags, check --out (and read the checkpoint with --resume), pick the device,
    seed, and load the training data; nothing is written until build()."""

    def __init__(self, parser: argparse.ArgumentParser, argv, kind: str, value_range: tuple[float, float],
                 splits: tuple[str, ...] = ("train",), fill_defaults=None, check=None):
        self.args = args = parser.parse_args(argv)
        self.kind = kind
        if args.out is None:  # the default folder names the dataset, so runs on two sets never meet
            args.out = default_out(kind, dataset_of(vars(args)))
        self.ckpt = start_run(args, parser, kind, cli.given_flags(parser, argv), fill_defaults)
        self.data = dataset_of(vars(args))  # as resumed: the run's own
        if args.conditional and self.data.multi_label:
            raise errors.UserError(f"--conditional: {self.data.name} is multi-label ({self.data.num_classes} findings, "
                                   "several per image), so there is no one class to condition on; train without it")
        if check is not None:
            check(args, self.data)
        self.out = Path(args.out)
        self.ckpt_path = self.out / "ckpt.pt"
        self.device = distributed.init_distributed(args)  # and joins the other processes under torchrun
        hardware.speed_up(self.device)
        loop.set_seed(args.seed)
        with distributed.main_first():  # only rank 0 may download; the others then read its file
            self.splits = load(self.data, args.data_root, splits=splits, subset=args.subset, download=distributed.is_main())
        args.subset = args.subset and len(self.splits["train"])  # the number used, for config.json
        self.batches = Batches(self.splits["train"], args.batch_size, self.device, value_range, seed=args.seed,
                               channels_last=args.channels_last, rank=distributed.rank(),
                               world_size=distributed.world_size())

    def build(self, make_trainer, latent_dim: int):
        """make_trainer(args, data, device) -> a trainer with .state() (models, optimisers, scalers, as
        the checkpoint names them); with --resume their state is restored. Then the run claims
        --out: it makes the folder, locks it and writes config.json. Returns the trainer."""
        resuming = self.ckpt_path if self.ckpt is not None else None
        with checkpoint.from_checkpoint(resuming):  # a resumed run's settings come from the file
            trainer = make_trainer(self.args, self.data, self.device)
        self.models, self.optimizers, self.scalers = trainer.state()
        self.meter = loop.Meter()
        self.epoch, self.step = 0, 0  # finished epochs, and steps into the next
        if self.ckpt is not None:
            with checkpoint.from_checkpoint(self.ckpt_path):
                self.epoch, self.step = checkpoint.restore_training_state(
                    self.ckpt, self.models, self.optimizers, self.meter, self.device, self.scalers)
        # rank 0 alone evaluates, logs and draws
        self.probe = metrics.KIDProbe(self.args, self.data, latent_dim, self.device) \
            if self.args.eval_every and distributed.is_main() else None
        claim_run(self.args, self.ckpt)  # nothing in --out has changed before this line
        self.log = checkpoint.MetricsLog(self.out / "metrics.jsonl", keep_epochs=self.epoch) \
            if distributed.is_main() else None
        return trainer

    def epochs(self):
        """The epochs still to train, with Ctrl-C (or SIGTERM) turned into a checkpoint and exit."""
        with loop.GracefulStop() as self.stop:
            for epoch in range(self.epoch, self.args.epochs):
                self.started = time.time()
                yield epoch

    def steps(self, epoch: int):
        """(index, batch) for each step of `epoch` still to take, behind a progress bar; index
        counts the run's batches from 1. After each step the running means are shown and checked
        every few steps, and a requested stop saves a checkpoint and exits."""
        bar = loop.epoch_bar(self.batches, epoch, self.step, self.args.epochs)
        for self.step, batch in enumerate(bar, start=self.step + 1):
            yield epoch * len(self.batches) + self.step, batch
            stopping = self.stop.due(self.step, len(self.batches))
            loop.show_progress(bar, self.meter, epoch, self.step, self.ckpt_path, force=stopping)
            if stopping:
                self.stop.save_and_exit(bar, self.save, epoch, self.step, self.ckpt_path)
        bar.close()
        self.step = 0

    def epoch_record(self, epoch: int) -> dict:
        """The log record of `epoch` (0-based): the running means of its steps, which a fresh
        meter then replaces. Every process must call this (under torchrun the means are averaged)."""
        record = {"epoch": epoch + 1, **self.meter.means()}
        self.meter = loop.Meter()
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


def default_out(kind: str, data: Dataset) -> str:
    """outputs/gan for BloodMNIST at 64, outputs/gan_pathmnist_28 for another dataset or size."""
    return f"outputs/{kind}" if data == Dataset() else f"outputs/{kind}_{data.name}_{data.size}"


# Settings a resumed run may change when given; everything else comes from the checkpoint.
# How a run computes (precision, memory format, compilation) may change too: it is not what it learns.
# So may the number of processes, and with it whether BatchNorm statistics are synchronised.
RESUME_MAY_CHANGE = {"epochs", "keep_every", "device", "data_root", "eval_every", "eval_n", "feature_cache",
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
    files.check_folder(out, "--out")
    if distributed.is_main() and out.is_dir():
        files.lock_folder(out)  # before reading its checkpoint: no other run may be writing it meanwhile
    ckpt_path = out / "ckpt.pt"
    ckpt = None
    if args.resume:
        if not ckpt_path.is_file():
            raise errors.UserError(f"--resume: no checkpoint at {ckpt_path}; start a new run without --resume")
        ckpt = checkpoint.load_checkpoint(ckpt_path, kind, training=True)
        saved, defaults = ckpt["args"], vars(parser.parse_args([]))
        for key, value in vars(args).items():
            if key in THIS_MACHINE or key not in saved:
                continue
            if not same_kind(saved[key], defaults[key]):
                raise errors.UserError(f"{ckpt_path} is not a checkpoint of this repo (its setting {key} is "
                                       f"{saved[key]!r}); was it written by train_{kind}.py?")
            if key not in given:
                setattr(args, key, saved[key])
            elif key not in RESUME_MAY_CHANGE and value != saved[key]:
                raise errors.UserError(f"--resume keeps the run's own settings, but --{key.replace('_', '-')} "
                                       f"{value} differs from its {saved[key]}; drop the flag, or start a "
                                       "new run with another --out")
        if ckpt["epoch"] >= args.epochs:
            raise errors.UserError(f"{ckpt_path} has already trained {ckpt['epoch']} epochs; pass "
                                   f"--epochs N with N > {ckpt['epoch']} to train longer")
    else:
        refuse_existing_run(out)
    if fill_defaults is not None:
        fill_defaults(args)
    return ckpt


def refuse_existing_run(out: Path) -> None:
    """A new run never replaces one: refuse a folder that already holds a checkpoint (ckpt.pt, or
    a kept ckpt_epoch_NNN.pt)."""
    held = sorted(out.glob("ckpt*.pt"))
    if held:
        raise errors.UserError(f"{out} already holds a run ({held[0]}); pass --resume to continue it, "
                               "or choose another --out")


def claim_run(args: argparse.Namespace, ckpt: dict | None) -> None:
    """The run has really started (its data, models and checkpoint are loaded): make --out, hold
    its lock for the rest of the process, and write config.json. Rank 0 alone writes."""
    if not distributed.is_main():
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files.lock_folder(out)
    if ckpt is None:
        refuse_existing_run(out)  # another run may have got there first, and finished
    else:
        print(f"Resuming {out / 'ckpt.pt'} at epoch {ckpt['epoch'] + 1}, step {ckpt['step']}")
    files.atomic_write_text(out / "config.json", json.dumps(vars(args), indent=2) + "\n")
