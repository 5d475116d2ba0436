"""The checkpoint file, its one owner: the dict that resumes a run exactly (save_training_state,
restore_training_state), reading and checking one (load_checkpoint, which also fills in the
settings older files lack), and the networks it holds, built for training, sampling and scoring
alike (networks, load_trained).

A checkpoint is {"format", "kind", "args", "epoch", "step", "models", "optimizers", "scalers",
"meter", "rng"}; "models" holds the state of each network by the name models/dcgan.py and
models/vae.py give it in build(): G, D, G_ema, lecam for a GAN, vae and critic for a VAE.
"""
import argparse
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from data import Dataset, md5
from models import dcgan, vae
from system import distributed, errors, files
from utils.log import Meter


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
# so resuming, sampling and scoring all see what the weights are, and nothing else guesses. Runs
# before --dataset trained on BloodMNIST at 64 from data/, on the whole training split; before
# --d-norm, D had BatchNorm, or layer norm under WGAN-GP; the GAN's latent size was called nz.
BEFORE = {"dataset": "bloodmnist", "size": 64, "data_root": "data", "subset": None, "data_md5": None}
ADDED_SETTINGS = {"gan": {**BEFORE, "class_loss": 0.0, "mbstd": 0, "latent_dim": lambda s: s.get("nz"),
                          "d_norm": lambda s: "layer" if s.get("loss") == "wgan-gp" else "batch"},
                  "vae": {**BEFORE, "critic_labels": False, "critic_blur": False, "upsample": "transposed", "class_loss": 0.0,
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


def save_training_state(path: Path, kind: str, args: argparse.Namespace, epoch: int, step: int,
                        models: dict, optimizers: dict, meter: Meter, device: torch.device,
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


def restore_training_state(ckpt: dict, models: dict, optimizers: dict, meter: Meter,
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


BUILD = {"gan": dcgan.build, "vae": vae.build}


def networks(kind: str, settings: dict, data: Dataset) -> dict[str, nn.Module]:
    """Every network of a run of `kind` with these settings, new, by its checkpoint name."""
    return BUILD[kind](settings, data)


@dataclass(eq=False)
class Trained:
    """A checkpoint's drawing network, in eval mode on its device (the GAN's G, or the EMA of G
    where the run kept one and use_ema asks for it; the VAE), and the run that trained it."""
    path: Path
    kind: str
    settings: dict  # the run's, as load_checkpoint fills them
    epochs: int  # finished epochs, which may be fewer than settings["epochs"]
    data: Dataset
    model: nn.Module
    has_ema: bool  # the run kept an EMA of G
    ema: bool  # and model is it

    @property
    def conditional(self) -> bool:
        return bool(self.settings["conditional"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def real_data(self, path: Path) -> dict:
        """The real data file a command compares this model with, by path and MD5 (for the JSON it
        writes), with a warning where it is not the file the model trained on."""
        digest, trained_on = md5(path), self.settings.get("data_md5")
        if trained_on and digest != trained_on:
            errors.warn(f"{path} (MD5 {digest}) is not the data {self.path} trained on (MD5 {trained_on}): "
                        "its real images are compared with a model of other data")
        return {"file": str(path), "md5": digest}


def load_trained(path: str | os.PathLike, device: torch.device, use_ema: bool = True) -> Trained:
    """The drawing network of the checkpoint at `path`, rebuilt from the settings it holds."""
    ckpt = load_checkpoint(path, map_location=device)
    data = Dataset(ckpt["args"]["dataset"], ckpt["args"]["size"])
    with from_checkpoint(Path(path)):
        nets = networks(ckpt["kind"], ckpt["args"], data)
        has_ema = "G_ema" in ckpt["models"]
        name = "G_ema" if use_ema and has_ema else "G" if "G" in nets else "vae"
        model = nets[name]
        model.load_state_dict(ckpt["models"][name])
    return Trained(Path(path), ckpt["kind"], ckpt["args"], ckpt["epoch"], data, model.to(device).eval(),
                   has_ema, name == "G_ema")
