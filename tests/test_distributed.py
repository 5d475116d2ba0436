"""Both training scripts under torchrun, on CPU with gloo and two processes: two processes with
global batch B learn what one process learns with batch B (the VAE, the VAE-GAN, the WGAN-GP
critic and, with --sync-bn, the DCGAN), write one run folder with means over both, resume with
another number of processes, stop together on Ctrl-C, keep identical models on every rank, and
refuse a batch that does not divide."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from system import distributed

from utils import checkpoint, log, training
import train_gan
from conftest import TINY_GAN, TINY_VAE, interrupt_after_first_epoch, run_script, script_command
from data import Batches, Dataset, load
from models import dcgan

# The comparisons of one process with two are at float32 rounding: --precision auto would pick
# bf16 on CPUs that compute it natively, whose 8-bit mantissa parts the two runs within steps.
FP32 = ["--precision", "fp32"]


def torchrun_command(nproc: int, script: str, *args) -> dict:
    """script_command's run, started by torchrun (`python -m torch.distributed.run` is torchrun)."""
    cmd = script_command(script, *args)
    cmd["args"] = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(nproc), *cmd["args"][1:]]
    return cmd


def torchrun(nproc: int, script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(**torchrun_command(nproc, script, *args), capture_output=True, timeout=300)


def launch(nproc: int, script: str, *args) -> None:
    """One process as a user runs it, or nproc under torchrun; the run must succeed."""
    r = run_script(script, *args) if nproc == 1 else torchrun(nproc, script, *args)
    assert r.returncode == 0, r.stderr[-3000:]


def largest_difference(a_path, b_path) -> dict[str, float]:
    """Per network, the largest absolute difference between the weights of two checkpoints."""
    a, b = checkpoint.load_checkpoint(a_path), checkpoint.load_checkpoint(b_path)
    assert a["models"].keys() == b["models"].keys()
    return {name: max((x.float() - b["models"][name][k].float()).abs().max().item()
                      for k, x in a["models"][name].items()) for name in a["models"]}


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def vae_runs(data_root, tmp_path_factory):
    """The tiny conditional VAE (its class prior learned outside DDP's forward) for 2 epochs of 4 steps
    (global batch 16): in one process, in two, and resumed after epoch 1 from two processes into
    one and from one into two."""
    root = tmp_path_factory.mktemp("vae_runs")
    common = ["--data-root", data_root, *TINY_VAE, *FP32, "--conditional"]
    launch(1, "train_vae.py", *common, "--epochs", 2, "--out", root / "one")
    launch(2, "train_vae.py", *common, "--epochs", 2, "--out", root / "two")
    for first, then in ((2, 1), (1, 2)):
        out = root / f"{first}_then_{then}"
        launch(first, "train_vae.py", *common, "--epochs", 1, "--out", out)
        launch(then, "train_vae.py", *common, "--epochs", 2, "--out", out, "--resume")
    return root


def test_vae_on_two_processes_learns_what_one_process_learns(vae_runs):
    # Adam divides by the gradient's running RMS, so a weight whose gradient is near zero (a rarely
    # active unit) moves by rounding differences: about 1e-5 in these 8 steps
    a, b = (checkpoint.load_checkpoint(vae_runs / run / "ckpt.pt")["models"]["vae"] for run in ("one", "two"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-5
    for k in ("prior_mu", "prior_logvar"):  # learned outside DDP's forward, averaged all the same
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    # the logged losses are means over both processes' shares: the whole batch's, as in one process
    for one, two in zip(records(vae_runs / "one"), records(vae_runs / "two"), strict=True):
        for key in ("loss", "recon", "kl", "val_nelbo", "val_psnr"):
            assert two[key] == pytest.approx(one[key], rel=1e-4), key


def test_two_processes_write_one_run(vae_runs):
    """Rank 0 alone writes: the same files as one process, one line per epoch, one checkpoint."""
    one, two = vae_runs / "one", vae_runs / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert [r["epoch"] for r in records(two)] == [1, 2]
    assert len(list(two.glob("*.pt"))) == 1 and not list(two.glob("*.tmp"))


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_with_another_number_of_processes(vae_runs, first, then):
    resumed = vae_runs / f"{first}_then_{then}"
    assert checkpoint.load_checkpoint(resumed / "ckpt.pt")["epoch"] == 2
    assert max(largest_difference(vae_runs / "one" / "ckpt.pt", resumed / "ckpt.pt").values()) < 1e-5
    assert [r["epoch"] for r in records(resumed)] == [1, 2]


def test_vae_gan_on_two_processes_learns_what_one_process_learns(data_root, tmp_path):
    """--adversarial: the patch discriminator (reading each image's class, and naming it with
    --class-loss) learns through DDP and judges the VAE's step outside it; both networks match one
    process's after 4 steps (no BatchNorm to synchronise)."""
    common = ["--data-root", data_root, *TINY_VAE, *FP32, "--adversarial", "0.01", "--critic-labels",
              "--class-loss", "0.01", "--epochs", 1]
    launch(1, "train_vae.py", *common, "--out", tmp_path / "one")
    launch(2, "train_vae.py", *common, "--out", tmp_path / "two")
    diff = largest_difference(tmp_path / "one" / "ckpt.pt", tmp_path / "two" / "ckpt.pt")
    assert diff.keys() == {"vae", "critic"} and max(diff.values()) < 5e-5, diff
    for one, two in zip(records(tmp_path / "one"), records(tmp_path / "two"), strict=True):
        for key in ("loss", "loss_d", "adversarial", "class_loss", "d_x"):
            assert two[key] == pytest.approx(one[key], rel=1e-4), key


SMALL_DATA = ["--conditional", "--g-labels", "batchnorm", "--augment", "all", "--lecam", "0.1", "--r1", "1",
              "--spectral-norm", "--class-loss", "1"]


@pytest.mark.parametrize("loss, extra, epochs, tolerance", [
    ("wgan-gp", [], 2, 5e-5),  # 8 critic steps through the double backward of the gradient penalty
    ("bce", ["--d-norm", "batch"], 1, 1e-4),  # 4 DCGAN steps: BatchNorm's backward magnifies rounding the most
    ("bce", SMALL_DATA, 1, 1e-4),  # augmentation, R1's double backward, LeCam's anchors, spectral norm, D's classifier
])
def test_gan_with_sync_bn_on_two_processes_learns_what_one_process_learns(data_root, tmp_path, loss, extra, epochs,
                                                                          tolerance):
    """--sync-bn gives G's BatchNorm (and the DCGAN discriminator's) the global batch's
    statistics, so two processes match one: the critic, G and its EMA, within float rounding
    (learning rate 1e-4 to 2e-4 a step)."""
    common = ["--data-root", data_root, *TINY_GAN, *FP32, "--recipe", "small-data", "--loss", loss, "--sync-bn",
              "--epochs", epochs, *extra]
    launch(1, "train_gan.py", *common, "--out", tmp_path / "one")
    launch(2, "train_gan.py", *common, "--out", tmp_path / "two")
    diff = largest_difference(tmp_path / "one" / "ckpt.pt", tmp_path / "two" / "ckpt.pt")
    assert {"G", "D", "G_ema"} <= diff.keys() and max(diff.values()) < tolerance, diff
    for one, two in zip(records(tmp_path / "one"), records(tmp_path / "two"), strict=True):
        for key in {"loss_d", "class_loss"} & one.keys():
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-4), key


def test_a_batch_that_does_not_divide_is_refused_in_one_line(data_root, tmp_path):
    r = torchrun(2, "train_vae.py", "--data-root", data_root, *TINY_VAE, "--batch-size", 15, "--out", tmp_path / "run")
    assert r.returncode != 0
    assert r.stderr.count("error: --batch-size 15 is the global batch, shared by 2 processes") == 1, r.stderr
    assert "use a multiple of 2 such as 14 or 16" in r.stderr
    assert "[rank0]" not in r.stderr and "[rank1]" not in r.stderr  # no Python traceback from a process


def test_only_rank_0_fetches_the_data_and_its_failure_stops_every_process(tmp_path):
    """A data folder that cannot be created (inside a file): rank 0's download fails at once, and
    the other process, waiting for it, stops too instead of hanging."""
    (tmp_path / "a_file").write_text("")
    r = torchrun(2, "train_vae.py", "--data-root", tmp_path / "a_file" / "data", *TINY_VAE, "--out", tmp_path / "run")
    assert r.returncode != 0
    assert r.stderr.count("error: ") == 1 and "the download failed" in r.stderr, r.stderr[-3000:]
    assert "[rank0]" not in r.stderr and "[rank1]" not in r.stderr


def test_ctrl_c_under_torchrun_stops_every_process_with_one_checkpoint(data_root, tmp_path):
    """torchrun passes a Ctrl-C to both processes; they agree on a step, rank 0 saves, and the
    run resumes in one process as if nothing had happened."""
    common = ["--data-root", data_root, *TINY_VAE, *FP32]
    out = tmp_path / "interrupted"
    _, err = interrupt_after_first_epoch(torchrun_command(2, "train_vae.py", *common, "--epochs", 1000, "--out", out), out)
    assert err.count("checkpoint saved") == 1, err[-3000:]
    ckpt = checkpoint.load_checkpoint(out / "ckpt.pt", "vae")
    epochs = ckpt["epoch"] + 2
    launch(1, "train_vae.py", *common, "--epochs", epochs, "--out", out, "--resume")
    launch(1, "train_vae.py", *common, "--epochs", epochs, "--out", tmp_path / "straight")
    assert max(largest_difference(out / "ckpt.pt", tmp_path / "straight" / "ckpt.pt").values()) < 1e-5


def _train_a_few_steps(rank: int, port: int, data_root: str, out: str, flags: list[str]) -> None:
    """One of two processes (as torchrun would start it): a few GAN steps, then its states to a file."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    args = train_gan.build_parser().parse_args(["--data-root", data_root, "--device", "cpu", *TINY_GAN,
                                                "--recipe", "small-data", *flags])
    train_gan.fill_defaults(args)
    device = distributed.init_distributed(args)
    training.set_seed(args.seed)
    split = load(Dataset(), data_root, splits=("train",))["train"]
    batches = Batches(split, args.batch_size, device, dcgan.VALUE_RANGE, seed=args.seed,
                      channels_last=args.channels_last, rank=rank, world_size=2)
    trainer = train_gan.GANTrainer(args, checkpoint.networks("gan", vars(args), Dataset()), device)
    meter = log.Meter()
    for step, (real, y) in enumerate(batches.epoch(0), start=1):
        trainer.step(real, y if args.conditional else None, step, meter)
    models, optimizers, _ = trainer.state()
    torch.save({"models": {k: m.state_dict() for k, m in models.items()},
                "optimizers": {k: o.state_dict()["state"] for k, o in optimizers.items()},
                "means": meter.means()}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("flags", [[], ["--conditional", "--n-critic", "2"]], ids=["dcgan", "conditional"])
def test_every_process_holds_the_same_gan(data_root, tmp_path, flags):
    """Without --sync-bn each process normalises its own share, so BatchNorm's running
    statistics differ between processes unless averaged: after a few steps G, D, G's EMA and
    both optimisers must be bit for bit the same on both ranks, and so must the logged means."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_train_a_few_steps, args=(port, str(data_root), str(tmp_path), flags), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert set(a["models"]) == {"G", "D", "G_ema"} | ({"lecam"} if "--conditional" in flags else set())  # the recipe's
    for part in ("models", "optimizers"):
        for name in a[part]:
            for k, x in a[part][name].items():
                y = b[part][name][k]
                same = all(torch.equal(x[s], y[s]) for s in x) if isinstance(x, dict) else torch.equal(x, y)
                assert same, f"{part} {name} {k} differs between ranks"
    assert a["means"] == b["means"]
