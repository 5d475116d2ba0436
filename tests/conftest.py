"""Shared fixtures: tiny BloodMNIST-format npz files made on the spot, and a script runner.

No test reads the real data or the network."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_images(n: int, seed: int = 0, size: int = 64, channels: int = 3, classes: int = 8,
                multi_label: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 images in the MedMNIST layout ((n, size, size, 3), or (n, size, size) in grey) with
    labels ((n, 1), or (n, classes) 0/1 columns): a class-coloured disc on a pale background, so
    there is something to learn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    yy, xx = (np.mgrid[:size, :size] * 64 / size)  # the 64-pixel picture at any size
    images = np.empty((n, size, size, 3), np.uint8)
    for i, c in enumerate(labels):
        c = c % 8
        cy, cx, r = rng.integers(24, 40), rng.integers(24, 40), 8 + c
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        colour = np.array([40 + 25 * c, 200 - 20 * c, 120 + 10 * c])
        img = np.full((size, size, 3), 225.0) + rng.normal(0, 6, (size, size, 3))
        img[disc] = colour + rng.normal(0, 6, (disc.sum(), 3))
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    if channels == 1:
        images = images.mean(3).astype(np.uint8)
    if multi_label:  # each image shows its class's finding, and at random some others
        columns = (rng.random((n, classes)) < 0.2) | (np.arange(classes) == labels[:, None])
        return images, columns.astype(np.uint8)
    return images, labels.reshape(-1, 1).astype(np.uint8)


def write_npz(path: Path, sizes=(64, 16, 16), dataset: str = "bloodmnist", size: int = 64, **override) -> Path:
    """A file in the MedMNIST layout of `dataset` at `size` (channels, classes and labels as
    medmnist.INFO says); `override` replaces or (with None) removes keys."""
    import data
    spec = data.Dataset(dataset, size)
    arrays = {}
    for seed, (split, n) in enumerate(zip(("train", "val", "test"), sizes)):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = make_images(
            n, seed, size, spec.channels, spec.num_classes, spec.multi_label)
    for k, v in override.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: numpy would append .npz to other names
        np.savez_compressed(f, **arrays)
    return path


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A folder holding a tiny bloodmnist_64.npz (64 train, 16 val, 16 test images)."""
    root = tmp_path_factory.mktemp("data")
    write_npz(root / "bloodmnist_64.npz")
    return root


def script_command(script: str, *args) -> dict:
    """Popen/run arguments for a top-level script run as a user would, from the repo root, on
    the CPU. One thread, always: float sums depend on the thread count, and the resume tests
    compare weights bit for bit across runs."""
    return dict(args=[sys.executable, str(ROOT / script), "--device", "cpu", *map(str, args)], cwd=ROOT,
                env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}, text=True)


def run_script(script: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(**script_command(script, *args), capture_output=True, timeout=timeout)


def interrupt_after_first_epoch(command: dict, out: Path) -> tuple[int, str]:
    """Start a training run (script_command's arguments), press Ctrl-C once its first epoch is
    logged in `out`, and return its exit status and stderr."""
    proc = subprocess.Popen(**command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


# Small widths keep every script run to seconds on two CPU cores. The VAE's tests train the plain
# recipe (no discriminator) unless they say otherwise; tests/test_vae_gan.py trains the default.
TINY_GAN = ["--ngf", "8", "--ndf", "8", "--nz", "16", "--batch-size", "16"]
TINY_VAE = ["--recipe", "plain", "--widths", "8,16", "--latent-dim", "8", "--batch-size", "16"]


def gan_args(flags: list[str]):
    """train_gan.py's settings for these flags, with the defaults its recipe and loss fill."""
    import train_gan
    args = train_gan.build_parser().parse_args(flags)
    train_gan.fill_defaults(args)
    return args


def vae_args(flags: list[str]):
    """train_vae.py's settings for these flags, with the defaults its recipe fills."""
    import train_vae
    args = train_vae.build_parser().parse_args(flags)
    train_vae.fill_defaults(args)
    return args


@pytest.fixture(scope="session")
def ckpts(data_root, tmp_path_factory):
    """One epoch each of a conditional GAN with EMA, an unconditional GAN without, and both VAEs."""
    import train_gan
    import train_vae
    root = tmp_path_factory.mktemp("runs")
    common = ["--data-root", str(data_root), "--device", "cpu", "--epochs", "1"]
    runs = {"cgan": (train_gan, TINY_GAN + ["--conditional", "--ema", "0.9"]), "gan": (train_gan, TINY_GAN + ["--ema", "0"]),
            "vae": (train_vae, TINY_VAE), "cvae": (train_vae, TINY_VAE + ["--conditional"])}
    for name, (module, extra) in runs.items():
        module.main([*common, *extra, "--out", str(root / name)])
    return {name: root / name / "ckpt.pt" for name in runs}


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory):
    """A folder for the feature network, and a small recipe for it (in this process only):
    evaluate.py and --eval-every then train it once, in seconds, and reuse it."""
    from evaluation import features
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features, "RECIPE", {**features.RECIPE, "widths": [16, 32], "epochs": 4, "batch_size": 16, "lr": 1e-2})
        yield tmp_path_factory.mktemp("features")


def straight_and_resumed(main, data_root, flags: list[str], tmp_path: Path, epochs: int = 3) -> tuple[dict, dict]:
    """The checkpoints of a run of `epochs` epochs straight through, and of one stopped an epoch
    earlier and resumed with only --resume, --out and --epochs typed, its settings read from its
    checkpoint. main: a training script's main()."""
    from utils import checkpoint
    common = ["--data-root", str(data_root), "--device", "cpu"]
    main([*common, *flags, "--epochs", str(epochs), "--out", str(tmp_path / "straight")])
    main([*common, *flags, "--epochs", str(epochs - 1), "--out", str(tmp_path / "resumed")])
    main([*common, "--epochs", str(epochs), "--out", str(tmp_path / "resumed"), "--resume"])
    return tuple(checkpoint.load_checkpoint(tmp_path / run / "ckpt.pt") for run in ("straight", "resumed"))


def stopped_and_resumed(main, flags: list[str], tmp_path: Path, monkeypatch) -> tuple[dict, dict]:
    """The checkpoints of a run straight through and of the same run stopped mid-epoch (as by
    Ctrl-C, after step 3 of epoch 2 where an epoch has 4 steps) and resumed with only --resume and
    --out typed, every setting the same: this is what a resume must match when the learning rate
    follows --epochs. main: a training script's main()."""
    from utils import checkpoint, cli, log
    main([*flags, "--out", str(tmp_path / "straight")])
    steps = {"n": 0}
    real_show = log.show_progress

    def stop_at_step_6(*args, **kwargs):
        steps["n"] += 1
        if steps["n"] == 6:  # Ctrl-C while step 2 of epoch 2 shows its progress: stop after step 3
            os.kill(os.getpid(), signal.SIGINT)
        return real_show(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(log, "show_progress", stop_at_step_6)
        with pytest.raises(SystemExit) as e:  # main saves and raises Interrupted; run_main exits with 130
            cli.run_main(lambda: main([*flags, "--out", str(tmp_path / "resumed")]))
    assert e.value.code == 130 and checkpoint.load_checkpoint(tmp_path / "resumed" / "ckpt.pt")["step"] == 3
    main([*flags, "--out", str(tmp_path / "resumed"), "--resume"])
    return tuple(checkpoint.load_checkpoint(tmp_path / run / "ckpt.pt") for run in ("straight", "resumed"))


def states_equal(a: dict, b: dict) -> bool:
    """Model and optimiser states of two checkpoints are identical, bit for bit."""
    flat = lambda ckpt: [t for part in ("models", "optimizers") for t in _tensors(ckpt[part])]
    ta, tb = flat(a), flat(b)
    return len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
