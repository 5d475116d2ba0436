"""A run's folder, new or resumed: where it goes (--out), the settings a resumed run keeps from
its checkpoint, and claiming the folder once the run has really started.

A new run refuses a folder that already holds a checkpoint, so no run is overwritten by
accident. With --resume the run's own settings come from its ckpt.pt: a flag typed on the
command line must agree with them unless it is in RESUME_MAY_CHANGE. The state itself (weights,
optimisers, random streams, where in the epoch) is restored by checkpoint.restore_training_state.
"""
import argparse
import json
from pathlib import Path

from data import Dataset
from system import distributed, errors, files
from utils import checkpoint, cli

# Settings a resumed run may change when given; everything else comes from the checkpoint.
# How a run computes (precision, memory format, compilation) may change too: it is not what it learns.
# So may the number of processes, and with it whether BatchNorm statistics are synchronised.
RESUME_MAY_CHANGE = {"epochs", "keep_every", "device", "data_root", "eval_every", "eval_n", "feature_cache",
                     "precision", "channels_last", "compile", "sync_bn"}
# Never taken from the checkpoint: where a run continues is this machine's choice (--device auto
# picks what this machine has), and --out/--resume name the run itself.
THIS_MACHINE = {"device", "out", "resume"}


def default_out(kind: str, data: Dataset) -> str:
    """outputs/gan for BloodMNIST at 64, outputs/gan_pathmnist_28 for another dataset or size."""
    return f"outputs/{kind}" if data == Dataset() else f"outputs/{kind}_{data.name}_{data.size}"


def settings(parser: argparse.ArgumentParser, argv, kind: str) -> tuple[argparse.Namespace, dict | None]:
    """The flags of a training script's command line, with --out filled in and checked; with
    --resume, the run's own settings restored from its checkpoint, which is returned too (None for
    a new run). Settings the flags leave at None are the script's to fill; nothing is written yet."""
    args = parser.parse_args(argv)
    if args.out is None:  # the default folder names the dataset, so runs on two sets never meet
        args.out = default_out(kind, Dataset(args.dataset, args.size))
    out = Path(args.out)
    files.check_folder(out, "--out")
    if distributed.is_main() and out.is_dir():
        files.lock_folder(out)  # before reading its checkpoint: no other run may be writing it meanwhile
    if not args.resume:
        refuse_existing_run(out)
        return args, None
    ckpt_path = out / "ckpt.pt"
    if not ckpt_path.is_file():
        raise errors.UserError(f"--resume: no checkpoint at {ckpt_path}; start a new run without --resume")
    ckpt = checkpoint.load_checkpoint(ckpt_path, kind, training=True)
    saved, defaults, given = ckpt["args"], vars(parser.parse_args([])), cli.given_flags(parser, argv)
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
    return args, ckpt


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


def refuse_existing_run(out: Path) -> None:
    """A new run never replaces one: refuse a folder that already holds a checkpoint (ckpt.pt, or
    a kept ckpt_epoch_NNN.pt)."""
    held = sorted(out.glob("ckpt*.pt"))
    if held:
        raise errors.UserError(f"{out} already holds a run ({held[0]}); pass --resume to continue it, "
                               "or choose another --out")


def claim(args: argparse.Namespace, ckpt: dict | None) -> None:
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
