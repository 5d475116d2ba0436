"""The checkpoint file: the one dict that resumes a run exactly (save_training_state,
restore_training_state), loading and checking one (load_checkpoint), and the metrics log beside it."""
import argparse
import contextlib
import json
import os
from pathlib import Path

import torch

from utils import distributed, errors, files, loop


def save_checkpoint(path: Path, state: dict) -> None:
    """A crash while saving never leaves a half-written ckpt.pt: the old one stays."""
    with files.atomic_write(path) as tmp:
        torch.save(state, tmp)


# The version of each kind's checkpoint layout and of the settings it records, raised by any change
# that older files cannot be read with; load_checkpoint refuses other versions in one line.
FORMATS = {"gan": 2, "vae": 3}
KINDS = tuple(FORMATS)
# Settings that a kind's checkpoints written before them lack, with the value their runs trained
# with (or the function of the run's other settings that gives it); load_checkpoint fills them in,
# so resuming and sampling both see what the weights are. Before --d-norm, D had BatchNorm, or
# layer norm under WGAN-GP.
ADDED_SETTINGS = {"gan": {"class_loss": 0.0, "d_norm": lambda s: "layer" if s.get("loss") == "wgan-gp" else "batch"}, "vae": {"critic_labels": False, "upsample": "transposed", "class_loss": 0.0,
                                                     "recipe": "plain"}}


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
    if ckpt["kind"] in FORMATS and ckpt.get("format") != FORMATS[ckpt["kind"]]:
        raise errors.UserError(f"{path} has checkpoint format {ckpt.get('format', 1)!r} and this version of the "
                               f"repo reads format {FORMATS[ckpt['kind']]} for a {ckpt['kind'].upper()}; train the "
                               "run again, or use it with the version that wrote it")
    wanted = {**CHECKPOINT_KEYS, **(TRAINING_KEYS if training else {})}
    wrong = [k for k, t in wanted.items() if not isinstance(ckpt.get(k), t)]
    if wrong or ckpt["kind"] not in KINDS:
        what = f"its {wrong[0]!r} is missing or not a {wanted[wrong[0]].__name__}" if wrong else \
            f"unknown kind {ckpt['kind']!r}"
        raise errors.UserError(f"{path} is not a checkpoint of this repo ({what}); was it written by "
                               "train_gan.py or train_vae.py?")
    if kind is not None and ckpt["kind"] != kind:
        raise errors.UserError(f"{path} was written by train_{ckpt['kind']}.py, not train_{kind}.py")
    ckpt["args"] = with_added_settings(ckpt["kind"], ckpt["args"])
    return ckpt


def with_added_settings(kind: str, saved: dict) -> dict:
    """A checkpoint's settings with those added since it was written, as its run trained."""
    added = {k: v(saved) if callable(v) else v for k, v in ADDED_SETTINGS[kind].items() if k not in saved}
    return {**added, **saved}


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
        "format": FORMATS[kind], "kind": kind, "args": vars(args), "epoch": epoch, "step": step,
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
