"""A run folder and its checkpoint: starting or resuming a run (start_run, then claim_run once the
run has really started), the one dict that resumes a run exactly, and the metrics log."""
import argparse
import contextlib
import json
import os
from pathlib import Path

import torch

import distributed
import errors
import files
import loop


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
    files.check_folder(out, "--out")
    if distributed.is_main() and out.is_dir():
        files.lock_folder(out)  # before reading its checkpoint: no other run may be writing it meanwhile
    ckpt_path = out / "ckpt.pt"
    ckpt = None
    if args.resume:
        if not ckpt_path.is_file():
            raise errors.UserError(f"--resume: no checkpoint at {ckpt_path}; start a new run without --resume")
        ckpt = load_checkpoint(ckpt_path, kind, training=True)
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
    """A new run never replaces one: refuse a folder that already holds a checkpoint."""
    if (out / "ckpt.pt").exists():
        raise errors.UserError(f"{out} already holds a run ({out / 'ckpt.pt'}); pass --resume to continue it, "
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
    if ckpt is not None:
        print(f"Resuming {out / 'ckpt.pt'} at epoch {ckpt['epoch'] + 1}, step {ckpt['step']}")
    files.atomic_write_text(out / "config.json", json.dumps(vars(args), indent=2) + "\n")


def save_checkpoint(path: Path, state: dict) -> None:
    """A crash while saving never leaves a half-written ckpt.pt: the old one stays."""
    with files.atomic_write(path) as tmp:
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
        raise errors.UserError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise errors.UserError(f"{path} is not a readable checkpoint ({type(e).__name__}); it may be "
                               "truncated or not from this repo") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise errors.UserError(f"{path} is not a checkpoint written by train_gan.py or train_vae.py")
    wanted = {**CHECKPOINT_KEYS, **(TRAINING_KEYS if training else {})}
    wrong = [k for k, t in wanted.items() if not isinstance(ckpt.get(k), t)]
    if wrong or ckpt["kind"] not in KINDS:
        what = f"its {wrong[0]!r} is missing or not a {wanted[wrong[0]].__name__}" if wrong else \
            f"unknown kind {ckpt['kind']!r}"
        raise errors.UserError(f"{path} is not a checkpoint of this repo ({what}); was it written by "
                               "train_gan.py or train_vae.py?")
    if kind is not None and ckpt["kind"] != kind:
        raise errors.UserError(f"{path} was written by train_{ckpt['kind']}.py, not train_{kind}.py")
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
                    errors.warn(f"{path}: line {number} is damaged and is dropped")
        files.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def save_training_state(path: Path, kind: str, args: argparse.Namespace, epoch: int, step: int,
                        models: dict, optimizers: dict, meter: "loop.Meter", device: torch.device,
                        scalers: dict | None = None) -> None:
    """One dict that resumes a run exactly: the networks, their optimisers (and fp16 gradient
    scalers), where the run stands (`epoch` finished epochs and `step` steps into the next), its
    settings and random states. Under torchrun every process calls this (the running means are
    averaged over them) and rank 0 writes: the processes hold identical weights and random
    states, so the file resumes with any number of processes."""
    meter_state = meter.state_dict()
    if not distributed.is_main():
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
        raise errors.UserError(f"{path} does not match this repo's models ({type(e).__name__}); was it "
                               "written by another version?") from None


def restore_training_state(ckpt: dict, models: dict, optimizers: dict, meter: "loop.Meter",
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
