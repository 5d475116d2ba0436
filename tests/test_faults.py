"""Faults a long run meets: a full disk (a real file-size limit, not a mock) at each kind of write
is one line with nothing half-written and the previous files intact; a resumed run refuses data
with other contents; every score and export names the checkpoint and data it came from by MD5;
and a run killed at random moments many times ends with the weights of one that never stopped."""
import json
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
from conftest import ROOT, TINY_GAN, gan_args, run_script, script_command, states_equal, write_npz

GAN = [*TINY_GAN, "--ema", "0.9"]


def limited(limit: int):
    """A child process that may write no file beyond `limit` bytes (RLIMIT_FSIZE): a write past
    it fails with EFBIG, as on a full disk."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def run_limited(script: str, limit: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run(**script_command(script, *args), capture_output=True, timeout=300, preexec_fn=limited(limit))


def snapshot(folder):
    return {p.name: data.md5(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: could not write") and "a full disk or a file-size limit" in line, line
    return line


@pytest.fixture(scope="module")
def one_epoch(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "gan"
    result = run_script("train_gan.py", "--data-root", data_root, "--epochs", "1", *GAN, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.mark.parametrize("what", ["checkpoint", "grid"])
def test_a_full_disk_while_training_is_one_line_and_resume_continues_exactly(one_epoch, data_root, tmp_path, what):
    out = tmp_path / "gan"
    shutil.copytree(one_epoch, out)
    before = snapshot(out)
    sizes = {"checkpoint": (out / "ckpt.pt").stat().st_size, "grid": (out / "samples_epoch_001.png").stat().st_size}
    result = run_limited("train_gan.py", sizes[what] - 1, "--data-root", data_root, "--epochs", "2", *GAN,
                         "--out", out, "--resume")
    one_line_error(result)
    after = snapshot(out)
    assert after["ckpt.pt"] == before["ckpt.pt"]  # the previous checkpoint, whole
    assert not list(out.glob("*.tmp"))
    resumed = run_script("train_gan.py", "--data-root", data_root, "--epochs", "2", *GAN, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = run_script("train_gan.py", "--data-root", data_root, "--epochs", "2", *GAN, "--out", tmp_path / "straight")
    assert straight.returncode == 0
    a, b = (torch.load(p / "ckpt.pt", weights_only=False) for p in (out, tmp_path / "straight"))
    assert states_equal(a, b)
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_full_disk_while_exporting_or_scoring_is_one_line(one_epoch, data_root, feature_cache, tmp_path):
    ckpt = one_epoch / "ckpt.pt"
    one_line_error(run_limited("sample.py", 4096, ckpt, "--n", "64", "--npz", tmp_path / "synthetic.npz"))
    assert not (tmp_path / "synthetic.npz").exists() and not list(tmp_path.glob("*.tmp"))
    run = tmp_path / "scored"
    shutil.copytree(one_epoch, run)
    # the feature network (a torch file of about 100 kB) cannot be cached: refused before any score is written
    one_line_error(run_limited("evaluate.py", 8192, run / "ckpt.pt", "--n", "16", "--no-reference",
                               "--feature-cache", tmp_path / "features"))
    assert not (run / "eval.json").exists() and not list((tmp_path / "features").glob("*.pt"))


def test_a_full_disk_while_logging_is_one_line(tmp_path):
    """metrics.jsonl grows by appending a line: a refused append is the same one line (a torn
    last line is dropped on --resume, tests/test_nothing_lost.py)."""
    code = ("import sys; from pathlib import Path; from utils import cli; from utils.log import MetricsLog; "
            "log = MetricsLog(Path(sys.argv[1])); cli.run_main(lambda: log.write({'epoch': 1, 'note': 'x' * 5000}))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "metrics.jsonl")], cwd=ROOT, text=True,
                            capture_output=True, timeout=120, preexec_fn=limited(1000))
    one_line_error(result)


def test_resume_refuses_data_with_other_contents_and_accepts_the_same_file_moved(data_root, tmp_path):
    out = tmp_path / "gan"
    assert run_script("train_gan.py", "--data-root", data_root, "--epochs", "1", *GAN, "--out", out).returncode == 0
    config = json.loads((out / "config.json").read_text())
    assert config["data_md5"] == data.md5(data_root / "bloodmnist_64.npz")
    other = write_npz(tmp_path / "other" / "bloodmnist_64.npz", (64, 16, 16), train_images=None)
    with np.load(data_root / "bloodmnist_64.npz") as f:  # the same shapes, other images
        images = f["train_images"][::-1].copy()
    write_npz(other, (64, 16, 16), train_images=images)
    result = run_script("train_gan.py", "--data-root", other.parent, "--epochs", "2", *GAN, "--out", out, "--resume")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "but this run trained on a file with MD5" in result.stderr.strip().splitlines()[-1]
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(data_root / "bloodmnist_64.npz", moved)
    result = run_script("train_gan.py", "--data-root", moved, "--epochs", "2", *GAN, "--out", out, "--resume")
    assert result.returncode == 0, result.stderr[-2000:]


def test_scores_name_the_checkpoint_and_the_data_by_md5(one_epoch, data_root, feature_cache, tmp_path, capsys):
    import evaluate
    run = tmp_path / "scored"
    shutil.copytree(one_epoch, run)
    evaluate.main([str(run / "ckpt.pt"), "--device", "cpu", "--n", "16", "--no-reference",
                   "--feature-cache", str(feature_cache), "--json", str(tmp_path / "all.json")])
    record = json.loads((run / "eval.json").read_text())
    assert record["checkpoint_md5"] == data.md5(run / "ckpt.pt")
    assert record["real_data"]["md5"] == data.md5(data_root / "bloodmnist_64.npz")
    everything = json.loads((tmp_path / "all.json").read_text())
    assert everything["results"][0]["checkpoint_md5"] == record["checkpoint_md5"]
    assert "is not the data" not in capsys.readouterr().err
    other = write_npz(tmp_path / "other" / "bloodmnist_64.npz", (64, 16, 20))  # other contents
    evaluate.main([str(run / "ckpt.pt"), "--device", "cpu", "--n", "16", "--no-reference", "--data-root", str(other),
                   "--feature-cache", str(feature_cache), "--json", str(tmp_path / "other.json")])
    assert "is not the data" in capsys.readouterr().err


def test_a_d_without_normalisation_is_wider_at_28_pixels():
    assert gan_args(["--size", "28"]).ndf == 128
    assert gan_args([]).ndf == 64  # BloodMNIST at 64: unchanged
    assert gan_args(["--size", "28", "--recipe", "paper"]).ndf == 64  # BatchNorm in D, as published
    assert gan_args(["--size", "28", "--ndf", "32"]).ndf == 32


def test_a_run_killed_at_random_moments_ends_as_one_that_never_stopped(data_root, tmp_path):
    """Ctrl-C or SIGKILL at random moments (mid-step, mid-save, mid-grid), then --resume, again
    and again: the last weights are those of a run that never stopped."""
    flags = ["--data-root", data_root, "--epochs", "8", *GAN]
    straight = run_script("train_gan.py", *flags, "--out", tmp_path / "straight")
    assert straight.returncode == 0
    out, rng, kills = tmp_path / "soak", random.Random(0), 0
    for attempt in range(12):
        resume = ["--resume"] if (out / "ckpt.pt").exists() else []
        config = out / "config.json"  # rewritten once the run has loaded everything and claimed --out
        before = config.stat().st_mtime_ns if config.exists() else None
        proc = subprocess.Popen(**script_command("train_gan.py", *flags, "--out", out, *resume),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while (config.stat().st_mtime_ns if config.exists() else None) == before:
            if proc.poll() is not None or time.time() > deadline:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 2.0))
        if proc.poll() is None and attempt < 8:
            proc.send_signal(rng.choice([signal.SIGINT, signal.SIGKILL]))
            kills += 1
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err, err[-2000:]
        # 130: Ctrl-C saved the run; -9: killed; -2: Ctrl-C after the run had ended, while Python exits
        assert proc.returncode in (0, 130, -signal.SIGKILL, -signal.SIGINT), err[-2000:]
        if (out / "ckpt.pt").exists() and torch.load(out / "ckpt.pt", weights_only=False)["epoch"] == 8:
            break
    assert kills >= 3
    a, b = (torch.load(p / "ckpt.pt", weights_only=False) for p in (out, tmp_path / "straight"))
    assert a["epoch"] == 8 and states_equal(a, b)
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))
