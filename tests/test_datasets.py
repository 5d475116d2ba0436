"""Every MedMNIST layout: grayscale and colour, 2 to 14 classes, multi-label, 28 to 224 pixels.

Tiny generated files in each dataset's own layout go through both training scripts, sample.py
(a grid, and an npz export that must load back as that dataset) and evaluate.py; the models are
checked for each size's shapes, and the mistakes a user can make across datasets (a file of
another layout, --conditional on a multi-label set, resuming or sampling with another dataset)
are refused in one line."""
import json

import numpy as np
import pytest
import torch

import data
import evaluate
import sample
import train_gan
import train_vae
from conftest import TINY_GAN, TINY_VAE, run_script, write_npz
from system.errors import UserError
from models.dcgan import Discriminator, Generator
from models.vae import VAE

# (dataset, size): what each case covers
CASES = [("octmnist", 64),        # grayscale, 4 classes
         ("pathmnist", 28),       # colour, 9 classes, 28 pixels (a 7x7 start)
         ("dermamnist", 128),     # colour, 7 classes, 128 pixels
         ("organamnist", 224),    # grayscale, 11 classes, 224 pixels (7x7 times 2^5)
         ("breastmnist", 64),     # 2 classes
         ("chestmnist", 28)]      # multi-label: 14 findings, unconditional models only


@pytest.mark.parametrize("size, start", [(28, 7), (64, 4), (128, 4), (224, 7)])
@pytest.mark.parametrize("nc", [1, 3])
def test_dcgan_builds_every_size(size, start, nc):
    G = Generator(nz=8, ngf=4, nc=nc, image_size=size, num_classes=3, labels="batchnorm")
    D = Discriminator(ndf=4, nc=nc, image_size=size, num_classes=3)
    assert G.net[0].kernel_size == (start, start) and D.out.kernel_size == (start, start)
    y = torch.tensor([0, 2])
    x = G(torch.randn(2, 8), y)
    assert x.shape == (2, nc, size, size)
    assert D(x, y).shape == (2,)


def test_dcgan_refuses_a_size_it_cannot_reach():
    with pytest.raises(ValueError, match="4 or 7 times a power of two"):
        Generator(image_size=48)


@pytest.mark.parametrize("size", data.SIZES)
def test_vae_keeps_every_size_and_channel_count(size):
    model = VAE(latent_dim=4, widths=(4, 8), nc=1, image_size=size, num_classes=2)
    x, y = torch.rand(2, 1, size, size), torch.tensor([0, 1])
    logits, mu, _ = model(x, y)
    assert logits.shape == x.shape and mu.shape == (2, 4)


def test_dataset_reads_medmnist_info():
    chest, path28 = data.Dataset("chestmnist", 128), data.Dataset("pathmnist", 28)
    assert chest.multi_label and chest.channels == 1 and chest.num_classes == 14 and chest.image_shape == (128, 128)
    assert chest.filename == "chestmnist_128.npz" and chest.url.endswith("chestmnist_128.npz?download=1")
    assert path28.filename == "pathmnist.npz" and path28.md5 == path28.info["MD5"]  # 28 pixels: no suffix
    assert not path28.multi_label and path28.channels == 3 and len(path28.class_names) == 9
    with pytest.raises(UserError, match="no 32-pixel files"):
        data.Dataset("bloodmnist", 32)


def test_grayscale_layout_round_trips():
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    t = data.as_tensor(images)
    assert t.shape == (3, 1, 28, 28) and np.array_equal(data.as_array(t), images)


@pytest.mark.parametrize("name, size", CASES)
def test_every_layout_trains_samples_and_scores(name, size, tmp_path, feature_cache):
    spec = data.Dataset(name, size)
    path = write_npz(tmp_path / spec.filename, sizes=(32, 8, 16), dataset=name, size=size)
    common = ["--dataset", name, "--size", str(size), "--data-root", str(path), "--device", "cpu", "--epochs", "1",
              "--feature-cache", str(feature_cache)]
    conditional = [] if spec.multi_label else ["--conditional"]
    train_gan.main([*common, *TINY_GAN, *conditional, "--out", str(tmp_path / "gan")])
    train_vae.main([*common, *TINY_VAE, "--eval-every", "1", "--eval-n", "16", "--out", str(tmp_path / "vae")])
    for run in ("gan", "vae"):
        config = json.loads((tmp_path / run / "config.json").read_text())
        assert (config["dataset"], config["size"]) == (name, size)
        assert (tmp_path / run / "samples_epoch_001.png").is_file()
    assert "kid" in json.loads((tmp_path / "vae" / "metrics.jsonl").read_text().splitlines()[-1])

    for run in ("gan", "vae"):
        ckpt = str(tmp_path / run / "ckpt.pt")
        sample.main([ckpt, "--device", "cpu", "--n", "16", "--out", str(tmp_path / f"{run}.png")])
        assert (tmp_path / f"{run}.png").is_file()
        sample.main([ckpt, "--device", "cpu", "--n", "12", "--npz", str(tmp_path / f"{run}.npz")])
        exported = data.load(spec, tmp_path / f"{run}.npz", splits=("train",))["train"]
        assert exported.images.shape == (12, *spec.image_shape)
        assert exported.labels.shape == ((12, spec.num_classes) if spec.multi_label else (12,))
    if not spec.multi_label:  # the unconditional VAE draws one class from its mixture
        sample.main([str(tmp_path / "vae" / "ckpt.pt"), "--device", "cpu", "--class", "1", "--n", "4",
                     "--npz", str(tmp_path / "one.npz")])
        assert set(data.load(spec, tmp_path / "one.npz", splits=("train",))["train"].labels) == {1}

    evaluate.main([str(tmp_path / "gan" / "ckpt.pt"), str(tmp_path / "vae" / "ckpt.pt"), "--device", "cpu",
                   "--n", "16", "--kid-subset-size", "8", "--kid-subsets", "4", "--feature-cache", str(feature_cache),
                   "--json", str(tmp_path / "eval.json")])
    results = json.loads((tmp_path / "eval.json").read_text())
    assert (results["dataset"], results["size"]) == (name, size)
    for row in results["results"][:2]:
        assert np.isfinite(row["fid"]) and len(row["class_shares"]) == spec.num_classes
    if not spec.multi_label:
        assert "class_accuracy" in results["results"][0]  # the conditional GAN drew the classes asked for


def test_multi_label_set_refuses_conditional_and_class_draws(tmp_path):
    path = write_npz(tmp_path / "chestmnist.npz", sizes=(16, 4, 4), dataset="chestmnist", size=28)
    common = ["--dataset", "chestmnist", "--size", "28", "--data-root", path, "--epochs", "1"]
    for script, tiny in (("train_gan.py", TINY_GAN), ("train_vae.py", TINY_VAE)):
        result = run_script(script, *common, *tiny, "--conditional", "--out", tmp_path / script)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert "multi-label" in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / script).exists()
    train_vae.main([*map(str, common), *TINY_VAE, "--device", "cpu", "--out", str(tmp_path / "vae")])
    for flags, what in ((["--prior", "classes"], "multi-label"), (["--class", "1"], "--class")):
        with pytest.raises(UserError, match=what):
            sample.main([str(tmp_path / "vae" / "ckpt.pt"), "--device", "cpu", *flags])
    with pytest.raises(UserError, match="multi-label"):
        evaluate.main([str(tmp_path / "vae" / "ckpt.pt"), "--device", "cpu", "--cas"])


@pytest.mark.parametrize("file_args, dataset_args, message", [
    ((), ("--dataset", "pathmnist", "--size", "28"), "expected (N, 28, 28, 3)"),            # a 64-pixel file as 28
    ((), ("--dataset", "octmnist"), "grayscale"),                                            # colour as grayscale
    (("chestmnist", 28), ("--dataset", "pneumoniamnist", "--size", "28"), "expected (16, 1)"),  # 14 columns as 1
])
def test_a_file_of_another_layout_is_refused_in_one_line(tmp_path, file_args, dataset_args, message):
    path = write_npz(tmp_path / "file.npz", sizes=(16, 4, 4), **dict(zip(("dataset", "size"), file_args)))
    result = run_script("train_vae.py", "--data-root", path, *dataset_args, *TINY_VAE, "--epochs", "1",
                        "--out", tmp_path / "run")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_resume_and_sampling_keep_the_runs_dataset(tmp_path, data_root):
    common = ["--device", "cpu", *TINY_VAE]
    train_vae.main([*common, "--data-root", str(data_root), "--epochs", "1", "--out", str(tmp_path / "vae")])
    with pytest.raises(UserError, match="--dataset pathmnist differs from its bloodmnist"):
        train_vae.main([*common, "--dataset", "pathmnist", "--epochs", "2", "--resume", "--out", str(tmp_path / "vae")])
    with pytest.raises(UserError, match="--size 128 differs from its 64"):
        train_vae.main([*common, "--size", "128", "--epochs", "2", "--resume", "--out", str(tmp_path / "vae")])
    other = write_npz(tmp_path / "pathmnist.npz", sizes=(8, 4, 4), dataset="pathmnist", size=28)
    with pytest.raises(UserError, match="expected \\(N, 64, 64, 3\\) for bloodmnist at 64x64"):
        sample.main([str(tmp_path / "vae" / "ckpt.pt"), "--device", "cpu", "--latent-map", "--data-root", str(other)])


def test_default_run_folder_names_the_dataset(tmp_path, monkeypatch):
    from utils import resume
    assert resume.default_out("gan", data.Dataset()) == "outputs/gan"
    assert resume.default_out("vae", data.Dataset("pathmnist", 28)) == "outputs/vae_pathmnist_28"
