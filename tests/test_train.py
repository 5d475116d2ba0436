"""train_gan.py and train_vae.py end to end: the files a run writes, exact resume (after a
finished run and after Ctrl-C mid-epoch), atomic checkpoints, NaN stops, and the one-line
errors a user gets for a bad file or a bad --resume."""
import json

import pytest
import torch
from PIL import Image

from system import errors

from utils import checkpoint, training
import train_gan
import train_vae
from conftest import (TINY_GAN, TINY_VAE, interrupt_after_first_epoch, run_script, script_command, states_equal,
                      stopped_and_resumed, write_npz)
from models.vae import VAE

SCRIPTS = {"gan": (train_gan, TINY_GAN), "vae": (train_vae, TINY_VAE)}


def test_gan_script_writes_its_run(data_root, tmp_path):
    out = tmp_path / "gan"
    r = run_script("train_gan.py", "--data-root", data_root, "--epochs", 2, "--out", out, *TINY_GAN)
    assert r.returncode == 0, r.stderr
    for name in ("config.json", "metrics.jsonl", "curves.png", "ckpt.pt",
                 "samples_epoch_001.png", "samples_epoch_002.png"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"loss_d", "loss_g", "d_x", "d_g_z"} <= records[0].keys()
    assert 0 < records[-1]["d_x"] < 1 and 0 < records[-1]["d_g_z"] < 1
    assert Image.open(out / "samples_epoch_002.png").size == (8 * 66 + 2, 8 * 66 + 2)  # 8 x 8 grid
    assert json.loads((out / "config.json").read_text())["ngf"] == 8
    ckpt = checkpoint.load_checkpoint(out / "ckpt.pt", "gan")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 0 and set(ckpt["models"]) == {"G", "D", "G_ema"}  # the default recipe: an EMA of G
    assert "loss_d=" in r.stderr  # the progress bar shows the losses


def test_vae_script_writes_its_run(data_root, tmp_path):
    out = tmp_path / "vae"
    r = run_script("train_vae.py", "--data-root", data_root, "--epochs", 2, "--out", out, *TINY_VAE)
    assert r.returncode == 0, r.stderr
    for name in ("config.json", "metrics.jsonl", "curves.png", "ckpt.pt", "samples_epoch_002.png",
                 "recon_epoch_001.png", "recon_epoch_002.png"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "recon", "kl", "val_nelbo", "val_recon", "val_kl", "val_psnr"} <= records[0].keys()
    assert records[-1]["val_nelbo"] == pytest.approx(records[-1]["val_recon"] + records[-1]["val_kl"])
    assert records[-1]["val_nelbo"] < records[0]["val_nelbo"]
    # 16 validation images: two rows of originals, each over a row of reconstructions
    assert Image.open(out / "recon_epoch_002.png").size == (8 * 66 + 2, 4 * 66 + 2)
    assert "recon=" in r.stderr


@pytest.mark.parametrize("kind", SCRIPTS)
def test_resume_gives_the_same_weights(data_root, tmp_path, kind):
    module, tiny = SCRIPTS[kind]
    common = ["--data-root", str(data_root), "--device", "cpu", *tiny]
    module.main([*common, "--epochs", "3", "--out", str(tmp_path / "straight")])
    module.main([*common, "--epochs", "1", "--out", str(tmp_path / "resumed")])
    module.main([*common, "--epochs", "3", "--out", str(tmp_path / "resumed"), "--resume"])
    a = checkpoint.load_checkpoint(tmp_path / "straight" / "ckpt.pt")
    b = checkpoint.load_checkpoint(tmp_path / "resumed" / "ckpt.pt")
    assert b["epoch"] == 3 and states_equal(a, b)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_keep_every_keeps_epochs_that_resume_like_the_run(data_root, tmp_path):
    common = ["--data-root", str(data_root), "--device", "cpu", *TINY_VAE]
    train_vae.main([*common, "--epochs", "3", "--keep-every", "2", "--out", str(tmp_path / "run")])
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt*.pt")) == ["ckpt.pt", "ckpt_epoch_002.pt"]
    kept = tmp_path / "again" / "ckpt.pt"
    kept.parent.mkdir()
    kept.write_bytes((tmp_path / "run" / "ckpt_epoch_002.pt").read_bytes())
    assert checkpoint.load_checkpoint(kept)["epoch"] == 2
    train_vae.main([*common, "--epochs", "3", "--resume", "--out", str(kept.parent)])
    assert states_equal(checkpoint.load_checkpoint(tmp_path / "run" / "ckpt.pt"), checkpoint.load_checkpoint(kept))
    (tmp_path / "run" / "ckpt.pt").unlink()  # a kept epoch alone still marks the folder as a run
    with pytest.raises(errors.UserError, match="ckpt_epoch_002.pt"):
        train_vae.main([*common, "--epochs", "1", "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("kind", SCRIPTS)
def test_ctrl_c_saves_and_resume_matches_an_uninterrupted_run(data_root, tmp_path, kind):
    tiny = SCRIPTS[kind][1]
    script = f"train_{kind}.py"
    common = ["--data-root", data_root, *tiny]
    out = tmp_path / "interrupted"
    code, err = interrupt_after_first_epoch(script_command(script, *common, "--epochs", 1000, "--out", out), out)
    assert code == 130, err
    assert "Traceback" not in err and "checkpoint saved" in err
    ckpt = checkpoint.load_checkpoint(out / "ckpt.pt", kind)
    epochs = ckpt["epoch"] + 2  # finish the interrupted epoch and one more
    r = run_script(script, *common, "--epochs", epochs, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    r = run_script(script, *common, "--epochs", epochs, "--out", tmp_path / "straight")
    assert r.returncode == 0, r.stderr
    a = checkpoint.load_checkpoint(out / "ckpt.pt")
    assert a["epoch"] == epochs
    assert states_equal(a, checkpoint.load_checkpoint(tmp_path / "straight" / "ckpt.pt"))


def test_the_learning_rate_schedules():
    """Constant keeps --lr; cosine starts at --lr, is halfway down halfway through and ends near 0,
    never rising on the way."""
    total = 100
    assert [training.learning_rate(2e-4, "constant", i, total) for i in (1, 50, 100)] == [2e-4] * 3
    cosine = [training.learning_rate(2e-4, "cosine", i, total) for i in range(1, total + 1)]
    assert cosine[0] == 2e-4 and cosine[50] == pytest.approx(1e-4) and 0 < cosine[-1] < 1e-7
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))


@pytest.mark.parametrize("main, tiny", [(train_vae.main, [*TINY_VAE, "--conditional", "--res-blocks", "1"]),
                                        (train_gan.main, TINY_GAN)], ids=["vae", "gan"])
def test_cosine_schedule_resumes_exactly(data_root, tmp_path, monkeypatch, main, tiny):
    """Stopped mid-run (as by Ctrl-C) and resumed with the same --epochs, the cosine schedule (and
    the VAE's learned class prior and fitted densities) pick up where they were: the weights end
    as in an uninterrupted run."""
    common = ["--data-root", str(data_root), "--device", "cpu", "--epochs", "3", "--schedule", "cosine", *tiny]
    a, b = stopped_and_resumed(main, common, tmp_path, monkeypatch)
    assert states_equal(a, b) and a["args"]["schedule"] == "cosine"
    if "vae" in a["models"]:
        for name in ("prior_scale", "class_scales", "class_weights", "prior_mu", "prior_logvar"):
            assert torch.equal(a["models"]["vae"][name], b["models"]["vae"][name])
    for opt in a["optimizers"].values():  # decayed near 0 (the last of 12 steps: 1.7 % of --lr)
        assert opt["param_groups"][0]["lr"] < 0.05 * a["args"]["lr"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    state = lambda x: {"format": checkpoint.FORMATS["gan"], "kind": "gan", "args": {}, "epoch": 1, "step": 0, "models": {"G": {"x": x}}}
    checkpoint.save_checkpoint(path, state(torch.ones(3)))

    def crash(obj, f, *args, **kwargs):
        open(f, "wb").write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(path, state(torch.zeros(3)))
    assert torch.equal(checkpoint.load_checkpoint(path)["models"]["G"]["x"], torch.ones(3))  # the old one is intact


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(data_root, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = VAE.loss

    def loss_that_breaks(*args, **kwargs):
        parts = real_loss(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 6:  # the first epoch (4 steps) and its validation (1 batch) are fine
            parts["loss"] = parts["loss"] * float("nan")
        return parts
    monkeypatch.setattr(VAE, "loss", loss_that_breaks)
    out = tmp_path / "vae"
    with pytest.raises(errors.UserError, match="diverged.*last good checkpoint"):
        train_vae.main(["--data-root", str(data_root), "--device", "cpu", "--epochs", "3",
                        "--out", str(out), *TINY_VAE])
    ckpt = checkpoint.load_checkpoint(out / "ckpt.pt", "vae")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["models"]["vae"].values())


def test_bad_file_is_one_line_error_from_the_script(tmp_path):
    bad = write_npz(tmp_path / "bloodmnist_64.npz", train_images=None)
    r = run_script("train_gan.py", "--data-root", bad, "--out", tmp_path / "out", *TINY_GAN)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr
    assert "lacks train_images" in r.stderr


def test_resume_refuses_what_it_cannot_do(data_root, tmp_path):
    common = ["--data-root", str(data_root), "--device", "cpu", *TINY_VAE]
    out = str(tmp_path / "vae")
    with pytest.raises(errors.UserError, match="no checkpoint"):
        train_vae.main([*common, "--epochs", "1", "--out", out, "--resume"])
    train_vae.main([*common, "--epochs", "1", "--out", out])
    with pytest.raises(errors.UserError, match="already holds a run"):
        train_vae.main([*common, "--epochs", "1", "--out", out])
    with pytest.raises(errors.UserError, match="already trained 1 epochs"):
        train_vae.main([*common, "--out", out, "--resume"])  # --epochs comes from the run: 1, not 25
    with pytest.raises(errors.UserError, match="--lr 0.01 differs"):
        train_vae.main([*common, "--epochs", "2", "--out", out, "--resume", "--lr", "0.01"])
    with pytest.raises(errors.UserError, match="written by train_vae.py, not train_gan.py"):
        train_gan.main(["--data-root", str(data_root), "--epochs", "2", "--out", out, "--resume"])
    (tmp_path / "vae" / "ckpt.pt").write_bytes(b"garbage")
    with pytest.raises(errors.UserError, match="not a readable checkpoint"):
        train_vae.main([*common, "--epochs", "2", "--out", out, "--resume"])


@pytest.mark.parametrize("flag", [["--epochs", "0"], ["--lr", "-1"], ["--subset", "0"],
                                  ["--batch-size", "x"], ["--device", "tpu"]])
def test_bad_flags_are_one_line_errors(flag, capsys):
    with pytest.raises(SystemExit) as e:
        train_gan.build_parser().parse_args(flag)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(lines) == 1 and lines[0].startswith("error: argument ")


def test_vae_widths_flag():
    assert train_vae.build_parser().parse_args(["--widths", "8,16,32"]).widths == (8, 16, 32)
    with pytest.raises(SystemExit):
        train_vae.build_parser().parse_args(["--widths", "8,,x"])


@pytest.mark.parametrize("module", [train_gan, train_vae])
def test_help_shows_defaults_once(module):
    text = module.build_parser().format_help()
    assert "(default: 25)" in text and "(default: 0)" in text  # --epochs, --seed
    assert "(default: None)" not in text and "(default: False)" not in text
