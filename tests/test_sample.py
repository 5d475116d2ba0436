"""sample.py on tiny checkpoints of every kind: grids, one class, MedMNIST-format export that
reloads through data.py with its labels, interpolation, VAE arithmetic and latent map, and the
one-line refusals where an option does not apply."""
import numpy as np
import pytest
import torch
from PIL import Image

import data
from system import errors
from utils.checkpoint import load_trained
from utils.sampling import class_draws, fixed_noise, use_density
import sample
from conftest import run_script


def run(*argv):
    sample.main(["--device", "cpu", *map(str, argv)])


@pytest.mark.parametrize("name", ["cgan", "gan", "vae", "cvae"])
def test_grid_from_every_kind_of_checkpoint(ckpts, tmp_path, name):
    out = tmp_path / "grid.png"
    run(ckpts[name], "--n", 16, "--out", out)
    width, height = Image.open(out).size
    assert width > 4 * 66 if name.startswith("c") else (width, height) == (4 * 66 + 2, 4 * 66 + 2)


def test_default_output_sits_beside_the_checkpoint(ckpts):
    run(ckpts["gan"])
    assert (ckpts["gan"].parent / "samples.png").is_file()


@pytest.mark.parametrize("name", ["cgan", "cvae"])
def test_npz_export_reloads_with_balanced_labels(ckpts, tmp_path, name):
    path = tmp_path / "synthetic.npz"
    run(ckpts[name], "--n", 20, "--npz", path)
    with np.load(path) as f:
        assert f["train_images"].shape == (20, 64, 64, 3) and f["train_images"].dtype == np.uint8
        assert f["train_labels"].shape == (20, 1)
        assert f["val_images"].shape == (0, 64, 64, 3) and f["test_labels"].shape == (0, 1)
    splits = data.load(data.Dataset(), path)
    counts = np.bincount(splits["train"].labels, minlength=8)
    assert counts.tolist() == [3, 3, 3, 3, 2, 2, 2, 2]
    assert len(splits["val"]) == 0


def test_npz_of_one_class_matches_the_grid_of_that_class(ckpts, tmp_path):
    run(ckpts["cgan"], "--n", 8, "--class", "neutrophil", "--npz", tmp_path / "n.npz")
    labels = data.load(data.Dataset(), tmp_path / "n.npz")["train"].labels
    assert labels.tolist() == [6] * 8
    run(ckpts["cgan"], "--n", 8, "--class", "6", "--npz", tmp_path / "six.npz")
    with np.load(tmp_path / "n.npz") as a, np.load(tmp_path / "six.npz") as b:
        assert np.array_equal(a["train_images"], b["train_images"])  # same seed, same class


def test_an_unconditional_vae_draws_the_classes_of_its_mixture(ckpts, tmp_path):
    """--prior classes picks each draw's class by the mixture weights (the training shares), and
    --class asks for one; the npz then carries real labels instead of placeholders."""
    run(ckpts["vae"], "--n", 400, "--npz", tmp_path / "all.npz")
    shares = np.bincount(data.load(data.Dataset(), tmp_path / "all.npz")["train"].labels, minlength=8) / 400
    weights = torch.load(ckpts["vae"], weights_only=True)["models"]["vae"]["class_weights"].numpy()
    assert np.abs(shares - weights).max() < 0.08
    for cls in ("basophil", "platelet"):
        run(ckpts["vae"], "--n", 4, "--class", cls, "--npz", tmp_path / f"{cls}.npz")
    with np.load(tmp_path / "basophil.npz") as a, np.load(tmp_path / "platelet.npz") as b:
        assert a["train_labels"].flatten().tolist() == [0] * 4 and b["train_labels"].flatten().tolist() == [7] * 4
        assert not np.array_equal(a["train_images"], b["train_images"])  # same noise, another component


def test_ema_is_used_unless_no_ema(ckpts, tmp_path):
    run(ckpts["cgan"], "--n", 8, "--npz", tmp_path / "ema.npz")
    run(ckpts["cgan"], "--n", 8, "--npz", tmp_path / "raw.npz", "--no-ema")
    with np.load(tmp_path / "ema.npz") as a, np.load(tmp_path / "raw.npz") as b:
        assert not np.array_equal(a["train_images"], b["train_images"])


def trained_model(path, prior):
    """A checkpoint's drawing network, drawing from `prior` (a VAE's density; None: its default)."""
    model = load_trained(path, torch.device("cpu")).model
    use_density(model, prior)
    return model


@pytest.mark.parametrize("name, prior", [("gan", None), ("vae", "gaussian"), ("vae", "classes")])
def test_temperature_scales_the_draws_about_the_density_mean(ckpts, name, prior):
    """generate() at temperature 0.5 draws what the latent half-way between a draw at 1 and the
    density's mean decodes to."""
    model = trained_model(ckpts[name], prior)
    y = class_draws(model, 12, seed=0)
    eps = fixed_noise(12, model.latent_dim, 0, torch.device("cpu"))
    with torch.no_grad():
        if name == "gan":
            z, mean, decode = eps, torch.zeros_like(eps), lambda z: model(z) * 0.5 + 0.5
        else:
            z = model.prior_latents(eps, prior, y)
            mean = model.prior_mean.expand_as(z) if prior == "gaussian" else model.class_means[y]
            decode = lambda z: model.decode(z, y)
        half = model.generate(eps, y, temperature=0.5)
        torch.testing.assert_close(half, decode(mean + 0.5 * (z - mean)), atol=1e-5, rtol=0)
        assert not torch.allclose(half, model.generate(eps, y, temperature=1.0))


@pytest.mark.parametrize("name, prior, expected", [("gan", None, 1.0), ("vae", "gaussian", 1.0), ("vae", "standard", 1.0),
                                                   ("vae", None, 1.2), ("vae", "classes", 1.2)])
def test_default_temperature_is_raised_for_the_class_gaussians_only(ckpts, name, prior, expected):
    model = trained_model(ckpts[name], prior)
    assert model.default_temperature == expected
    y = class_draws(model, 6, seed=0)
    eps = fixed_noise(6, model.latent_dim, 0, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(model.generate(eps, y), model.generate(eps, y, temperature=expected))


def test_interpolation_rows(ckpts, tmp_path):
    out = tmp_path / "interp.png"
    run(ckpts["gan"], "--interpolate", "--n", 3, "--steps", 5, "--out", out)
    assert Image.open(out).size == (5 * 66 + 2, 3 * 66 + 2)


def test_slerp_endpoints_and_norm():
    z0, z1 = torch.tensor([[3.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    path = sample.slerp(z0, z1, torch.linspace(0, 1, 5))
    assert path.shape == (2, 5, 2)
    torch.testing.assert_close(path[:, 0], z0)
    torch.testing.assert_close(path[:, -1], z1)
    torch.testing.assert_close(path[0].norm(dim=1), torch.full((5,), 3.0))  # stays on the circle
    torch.testing.assert_close(path[1], z0[1].expand(5, 2))  # parallel ends: no division by zero


def test_vae_arithmetic_and_latent_map(ckpts, data_root, tmp_path):
    out = tmp_path / "arith.png"
    run(ckpts["vae"], "--arithmetic", "basophil", "7", "--n", 2, "--steps", 4, "--data-root", data_root,
        "--out", out)
    assert Image.open(out).size == (5 * 66 + 2, 2 * 66 + 2)  # a real column, then 4 steps
    run(ckpts["vae"], "--latent-map", "--data-root", data_root, "--out", tmp_path / "map.png")
    assert Image.open(tmp_path / "map.png").size[0] > 1000


@pytest.mark.parametrize("name,argv,message", [
    ("gan", ["--class", "3"], "needs a conditional checkpoint or a VAE drawn from its class mixture"),
    ("vae", ["--class", "3", "--prior", "gaussian"], "needs a conditional checkpoint or a VAE"),
    ("cgan", ["--class", "macrophage"], "unknown class 'macrophage'"),
    ("gan", ["--latent-map"], "is a GAN"),
    ("gan", ["--arithmetic", "0", "1"], "is a GAN"),
    ("cvae", ["--arithmetic", "0", "1"], "needs an unconditional VAE"),
    ("gan", ["--interpolate", "--npz", "x.npz"], "does not combine"),
])
def test_options_that_do_not_apply_are_refused(ckpts, name, argv, message):
    with pytest.raises(errors.UserError, match=message):
        run(ckpts[name], *argv)


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    r = run_script("sample.py", junk)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: {junk} is not a readable checkpoint (UnpicklingError); it may be truncated or not from this repo"]
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(errors.UserError, match="not a checkpoint written by train_gan.py or train_vae.py"):
        run(tmp_path / "other.pt")
    with pytest.raises(errors.UserError, match="not found"):
        run(tmp_path / "missing.pt")
