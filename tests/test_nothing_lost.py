"""Careless use loses nothing: every bad input a user can type or point at ends in one `error:`
line with exit status 1 and no traceback, and leaves every checkpoint, data file and run folder
byte for byte as it was. Outputs never replace a checkpoint or a dataset, a run owns its folder,
nothing in a run folder changes before the run has started, a damaged log line does not block a
resume, values that cannot work are refused before any work, and a two-epoch GAN draws a grid
that shows what G makes."""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from data import md5
import torch
from PIL import Image

from system import errors, files

from utils import checkpoint, cli, pictures
import sample
import train_gan
import train_vae
from conftest import ROOT, TINY_GAN, TINY_VAE, run_script, write_npz


def snapshot(*paths) -> dict:
    """Every file under the paths (folders walked), name -> bytes."""
    files = {}
    for path in paths:
        for f in ([path] if path.is_file() else sorted(path.rglob("*"))):
            if f.is_file():
                files[str(f)] = f.read_bytes()
    return files


def one_line_error(r: subprocess.CompletedProcess, *parts: str) -> str:
    """The run failed with exactly one `error:` line (warnings may precede it) and no traceback."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr[-2000:]
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    """A finished one-epoch VAE run and a one-epoch GAN run."""
    root = tmp_path_factory.mktemp("lost")
    for kind, tiny in (("vae", TINY_VAE), ("gan", TINY_GAN)):
        r = run_script(f"train_{kind}.py", "--data-root", data_root, "--epochs", 1, "--out", root / kind, *tiny)
        assert r.returncode == 0, r.stderr
    return root


# 1. Outputs never replace a checkpoint or a dataset, nor any file without --overwrite

def test_outputs_never_replace_a_checkpoint_or_a_dataset(run, data_root, tmp_path):
    ckpt, data = run / "gan" / "ckpt.pt", data_root / "bloodmnist_64.npz"
    before = snapshot(run / "gan", data)
    one_line_error(run_script("sample.py", ckpt, "--n", 4, "--npz", ckpt), "name a .npz file")
    for flags in ([], ["--overwrite"]):
        one_line_error(run_script("sample.py", ckpt, "--n", 4, "--npz", data, *flags), "checkpoint or a dataset")
    one_line_error(run_script("sample.py", ckpt, "--n", 4, "--out", ckpt, "--overwrite"), "name a .png")
    one_line_error(run_script("evaluate.py", ckpt, "--json", ckpt, "--overwrite"), "name a .json file")
    assert snapshot(run / "gan", data) == before


def test_an_existing_output_is_replaced_only_with_overwrite(run, tmp_path):
    ckpt, npz, png = run / "gan" / "ckpt.pt", tmp_path / "synthetic.npz", tmp_path / "grid.png"
    assert run_script("sample.py", ckpt, "--n", 4, "--npz", npz).returncode == 0
    assert run_script("sample.py", ckpt, "--n", 4, "--out", png).returncode == 0
    before = snapshot(tmp_path)
    one_line_error(run_script("sample.py", ckpt, "--n", 4, "--npz", npz), "already exists", "--overwrite")
    one_line_error(run_script("sample.py", ckpt, "--n", 4, "--out", png), "already exists", "--overwrite")
    assert snapshot(tmp_path) == before
    r = run_script("sample.py", ckpt, "--n", 6, "--npz", npz, "--overwrite")  # an export of sample.py's own
    assert r.returncode == 0 and "replaced the earlier one" in r.stdout
    with np.load(npz) as f:
        assert len(f["train_images"]) == 6


# 2. A run owns its folder

HOLD = "import sys, time; sys.path.insert(0, sys.argv[1]); from system import files; files.lock_folder(sys.argv[2]); " \
       "print('held', flush=True); time.sleep(120)"


def test_a_second_run_on_a_busy_folder_is_refused_and_a_crashed_one_leaves_no_lock(data_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(ROOT), str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"  # a run is writing there
    args = ("--data-root", data_root, "--epochs", 1, "--out", out, *TINY_VAE)
    one_line_error(run_script("train_vae.py", *args), "another run is writing to")
    assert not any(out.iterdir())
    holder.send_signal(signal.SIGKILL)  # it crashes: the operating system drops its lock
    holder.wait()
    r = run_script("train_vae.py", *args)
    assert r.returncode == 0, r.stderr
    one_line_error(run_script("train_vae.py", *args), "already holds a run")


# 3. Nothing in the run folder changes until the run has started

def test_a_resume_that_fails_leaves_the_folder_as_it_was(run, tmp_path):
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not really")
    before = snapshot(run / "vae")
    one_line_error(run_script("train_vae.py", "--resume", "--epochs", 3, "--out", run / "vae", "--data-root", broken),
                   "is not an .npz file")
    one_line_error(run_script("train_vae.py", "--resume", "--epochs", 3, "--out", run / "vae", "--batch-size", 128),
                   "--batch-size 128 differs from its 16")  # typed at its default value, still refused
    one_line_error(run_script("train_vae.py", "--epochs", 3, "--out", run / "vae", *TINY_VAE), "already holds a run")
    assert snapshot(run / "vae") == before


# 4. A damaged log line does not block the checkpoint

def test_a_half_written_log_line_is_dropped_on_resume(data_root, tmp_path):
    args = ("--data-root", data_root, "--out", tmp_path / "vae", *TINY_VAE)
    assert run_script("train_vae.py", *args, "--epochs", 1).returncode == 0
    log = tmp_path / "vae" / "metrics.jsonl"
    log.write_text(log.read_text() + '{"epoch": 2, "loss": 12')
    r = run_script("train_vae.py", *args, "--epochs", 2, "--resume")
    assert r.returncode == 0 and "line 2 is damaged and is dropped" in r.stderr, r.stderr
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]


# 5, 9, 16. Values that cannot work are refused before any work

@pytest.mark.parametrize("script, flags, message", [
    ("train_gan.py", ["--eval-every", 1, "--eval-n", 1], "--eval-n: must be an integer >= 2"),
    ("train_gan.py", ["--n-critic", 9, "--epochs", 2], "--n-critic 9 is more than the run's 8 steps"),
    ("train_vae.py", ["--subset", 0], "--subset: must be a positive integer"),
    ("evaluate.py", ["CKPT", "--n", 3], "--n: must be an integer >= 4"),
    ("evaluate.py", ["CKPT", "--kid-subset-size", 1], "--kid-subset-size: must be an integer >= 2"),
])
def test_values_that_cannot_work_are_refused_at_the_start(run, data_root, tmp_path, script, flags, message):
    flags = [run / "gan" / "ckpt.pt" if f == "CKPT" else f for f in flags]
    tiny = [] if script == "evaluate.py" else ["--out", tmp_path / "run", *(TINY_GAN if "gan" in script else TINY_VAE)]
    one_line_error(run_script(script, *flags, "--data-root", data_root, *tiny), message)
    assert not (tmp_path / "run").exists()


def test_evaluate_checks_its_inputs_before_training_the_feature_network(run, tmp_path):
    cache = tmp_path / "cache"
    no_test = write_npz(tmp_path / "no_test.npz", sizes=(64, 16, 0))
    one_line_error(run_script("evaluate.py", run / "gan" / "ckpt.pt", "--data-root", no_test, "--feature-cache", cache),
                   "test split", "has 0 images")
    (tmp_path / "folder.json").mkdir()
    one_line_error(run_script("evaluate.py", run / "gan" / "ckpt.pt", "--json", tmp_path / "folder.json",
                              "--feature-cache", cache), "is a folder")
    assert not cache.exists()


def test_subset_larger_than_the_split_records_the_number_used(data_root, tmp_path):
    r = run_script("train_vae.py", "--data-root", data_root, "--epochs", 1, "--subset", 1000, "--out", tmp_path / "v", *TINY_VAE)
    assert r.returncode == 0 and "--subset 1000 is more than the 64 training images" in r.stderr
    assert json.loads((tmp_path / "v" / "config.json").read_text())["subset"] == 64


# 6, 7, 8. Output paths that cannot be written

def test_output_paths_that_cannot_be_written_are_one_line_errors(run, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    ckpt = run / "gan" / "ckpt.pt"
    for script, tiny in (("train_gan.py", TINY_GAN), ("train_vae.py", TINY_VAE)):
        one_line_error(run_script(script, "--out", a_file, *tiny), "is a file, not a folder")
        one_line_error(run_script(script, "--out", a_file / "run", *tiny), "is a file, not a folder")
    one_line_error(run_script("sample.py", ckpt, "--npz", a_file / "x.npz"), "is a file, not a folder")
    one_line_error(run_script("sample.py", ckpt, "--out", tmp_path / "grid"), "name a .png")
    (tmp_path / "dir.png").mkdir()
    one_line_error(run_script("sample.py", ckpt, "--out", tmp_path / "dir.png"), "is a folder")
    assert a_file.read_text() == "mine"
    r = run_script("sample.py", ckpt, "--n", 4, "--out", tmp_path / "new" / "deeper" / "grid.png")
    assert r.returncode == 0 and (tmp_path / "new" / "deeper" / "grid.png").is_file()


def test_a_read_only_folder_is_refused_before_work(tmp_path, monkeypatch):
    """As root, permissions do not bind, so the read-only answer of the system is simulated."""
    ro = tmp_path / "read_only"
    ro.mkdir()
    real_access = files.os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    with pytest.raises(errors.UserError, match="cannot write into .*read_only.*read-only"):
        train_vae.main(["--out", str(ro / "run"), *TINY_VAE])
    with pytest.raises(errors.UserError, match="read-only"):
        files.check_output(ro / "grid.png", "--out", pictures.PICTURES, overwrite=False)


def test_an_os_error_during_a_run_is_one_line(tmp_path, capsys):
    def main():
        raise PermissionError(13, "Permission denied", str(tmp_path / "ckpt.pt"))
    with pytest.raises(SystemExit) as e:
        cli.run_main(main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and err == [f"error: PermissionError on {tmp_path / 'ckpt.pt'}: permission denied; "
                                         "check that the path exists, is writable and has free space"]


# 10, 11. Tiny splits

def test_a_vae_on_one_image_fits_its_prior(data_root, tmp_path):
    train_vae.main(["--data-root", str(data_root), "--device", "cpu", "--epochs", "1", "--subset", "1",
                    "--out", str(tmp_path / "one"), *TINY_VAE])
    vae = checkpoint.load_checkpoint(tmp_path / "one" / "ckpt.pt")["models"]["vae"]
    assert torch.isfinite(vae["prior_scale"]).all() and torch.isfinite(vae["prior_mean"]).all()


def test_latent_map_of_a_one_image_split_is_refused(run, tmp_path):
    one = write_npz(tmp_path / "one.npz", sizes=(64, 16, 1))
    one_line_error(run_script("sample.py", run / "vae" / "ckpt.pt", "--latent-map", "--data-root", one,
                              "--out", tmp_path / "map.png"), "has 1 images, too few")


# 12, 17. Crafted checkpoints and files

@pytest.mark.parametrize("content, message", [
    ({"kind": "gan"}, "'args' is missing"),
    ({"kind": "diffusion", "args": {}, "epoch": 1, "step": 0, "models": {}}, "unknown kind 'diffusion'"),
    ({"kind": "gan", "args": {}, "epoch": 1, "step": 0, "models": {"G": {}}}, "does not match this repo's models"),
    ({"kind": "vae", "args": [], "epoch": 1, "step": 0, "models": {}}, "'args' is missing or not a dict"),
])
def test_crafted_checkpoints_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "ckpt.pt"
    torch.save({"format": checkpoint.FORMATS.get(content["kind"]), **content}, path)
    before = snapshot(tmp_path)
    one_line_error(run_script("sample.py", path), message)
    one_line_error(run_script("evaluate.py", path, "--feature-cache", tmp_path / "cache"), message)
    if content["kind"] in ("gan", "vae"):
        one_line_error(run_script(f"train_{content['kind']}.py", "--resume", "--out", tmp_path), "not a checkpoint of this repo")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["gan", "vae"])
def test_a_checkpoint_of_an_older_format_is_refused_in_one_line(run, tmp_path, kind):
    ckpt = torch.load(run / kind / "ckpt.pt", weights_only=True)
    del ckpt["format"]  # as the repo wrote them before checkpoints carried a version
    out = tmp_path / kind
    out.mkdir()
    torch.save(ckpt, out / "ckpt.pt")
    before = snapshot(tmp_path)
    for result in (run_script("sample.py", out / "ckpt.pt"), run_script("evaluate.py", out / "ckpt.pt"),
                   run_script(f"train_{kind}.py", "--resume", "--epochs", 5, "--out", out)):
        one_line_error(result, "has checkpoint format 1 and this version of the repo reads format")
    assert snapshot(tmp_path) == before


def test_a_feature_cache_that_is_not_ours_is_one_line(run, data_root, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    file = cache / f"classifier_bloodmnist_64_{md5(data_root / 'bloodmnist_64.npz')[:12]}.pt"
    torch.save([1, 2, 3], file)
    one_line_error(run_script("evaluate.py", run / "gan" / "ckpt.pt", "--feature-cache", cache), "delete it to retrain")


def test_a_file_that_is_not_a_zip_says_so(tmp_path):
    bad = tmp_path / "bloodmnist_64.npz"
    bad.write_bytes(b"\x93NUMPY not an archive")
    line = one_line_error(run_script("train_vae.py", "--data-root", bad, "--out", tmp_path / "r", *TINY_VAE),
                          "is not an .npz file")
    assert "pickle" not in line


# 13, 14. Resume takes this machine's device and honours typed flags

def test_a_gpu_run_resumes_with_device_auto_on_this_machine(data_root, tmp_path):
    out = tmp_path / "vae"
    train_vae.main(["--data-root", str(data_root), "--device", "cpu", "--epochs", "1", "--out", str(out), *TINY_VAE])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["args"]["device"] = "cuda"  # as if trained on a GPU
    torch.save(ckpt, out / "ckpt.pt")
    train_vae.main(["--out", str(out), "--resume", "--epochs", "2"])  # --device auto: this machine's choice
    assert checkpoint.load_checkpoint(out / "ckpt.pt")["epoch"] == 2


# 18. The data a checkpoint was trained on

def test_sample_and_evaluate_read_the_data_root_from_the_checkpoint(run, data_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ here: the checkpoint's own data root must be used
    sample.main([str(run / "vae" / "ckpt.pt"), "--device", "cpu", "--latent-map", "--out", str(tmp_path / "m.png")])
    assert (tmp_path / "m.png").is_file() and not (tmp_path / "data").exists()


# 19. A short GAN run draws what G makes

def test_a_two_epoch_gan_grid_is_not_one_flat_colour(tmp_path):
    data = write_npz(tmp_path / "bloodmnist_64.npz", sizes=(512, 8, 8))
    train_gan.main(["--data-root", str(data), "--device", "cpu", "--subset", "512", "--epochs", "2",
                    "--ngf", "8", "--ndf", "8", "--out", str(tmp_path / "gan")])
    grid = np.asarray(Image.open(tmp_path / "gan" / "samples_epoch_002.png")).astype(float) / 255
    cells = [grid[2 + 66 * r:66 * (r + 1), 2 + 66 * c:66 * (c + 1)] for r in range(8) for c in range(8)]
    assert min(cell.std() for cell in cells) > 0.02  # every image has structure, not one grey


def test_ctrl_c_outside_the_training_loop_is_one_line(capsys):
    def main():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        cli.run_main(main)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 130 and len(err) == 1 and err[0].startswith("interrupted: ")
