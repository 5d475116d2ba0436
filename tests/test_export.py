"""sample.py --medmnist: a folder that the medmnist package's own dataset classes load as the
dataset the model imitates (length, indexing, every split), with a synthetic train split in the
real classes' shares and the real val and test splits copied; grey, RGB and multi-label."""
import json

import medmnist
import numpy as np
import pytest
import torch

import data
import sample
import train_gan
import train_vae
from evaluation import distances, features
from conftest import TINY_GAN, TINY_VAE, write_npz
from system import errors


def export(ckpt, out, *flags):
    sample.main(["--device", "cpu", str(ckpt), "--medmnist", str(out), *map(str, flags)])


def official_file(root, dataset, size):
    """A file of the official split counts, as medmnist's INFO records them."""
    n = medmnist.INFO[dataset]["n_samples"]
    return write_npz(root / data.Dataset(dataset, size).filename, (n["train"], n["val"], n["test"]), dataset, size)


def test_a_grey_drop_in_loads_with_medmnist_and_keeps_the_real_splits(tmp_path, capsys):
    real = official_file(tmp_path / "real", "breastmnist", 28)  # 546 / 78 / 156 grey images, 2 classes
    train_gan.main(["--dataset", "breastmnist", "--size", "28", "--data-root", str(real.parent), "--device", "cpu",
                    "--epochs", "1", "--conditional", *TINY_GAN, "--out", str(tmp_path / "run")])
    capsys.readouterr()
    export(tmp_path / "run" / "ckpt.pt", tmp_path / "synthetic")
    assert "refuse len()" not in capsys.readouterr().err  # official counts: nothing to say
    for split, n in medmnist.INFO["breastmnist"]["n_samples"].items():
        ds = medmnist.BreastMNIST(split=split, root=str(tmp_path / "synthetic"), size=28)
        assert len(ds) == n
        image, label = ds[n - 1]
        assert image.size == (28, 28) and image.mode == "L" and label.shape == (1,)
    with np.load(tmp_path / "synthetic" / "breastmnist.npz") as f, np.load(real) as r:
        for key in ("val_images", "val_labels", "test_images", "test_labels"):
            assert np.array_equal(f[key], r[key])
        counts = np.bincount(f["train_labels"][:, 0], minlength=2)
        real_counts = np.bincount(r["train_labels"][:, 0], minlength=2)
        assert counts.tolist() == real_counts.tolist()  # the same n, so the same counts exactly
        assert not np.array_equal(f["train_images"], r["train_images"])
        about = json.loads(str(f["synthetic_about"]))
    assert about["train"] == "synthetic" and about["val"] == about["test"] == "real"
    assert about["checkpoint_md5"] == data.md5(tmp_path / "run" / "ckpt.pt")
    assert about["real_md5"] == data.md5(real)


def test_a_model_that_draws_no_classes_gets_its_labels_from_the_classifier(ckpts, data_root, feature_cache,
                                                                            tmp_path, capsys):
    export(ckpts["gan"], tmp_path / "synthetic", "--n", 40, "--feature-cache", feature_cache)
    err = capsys.readouterr().err
    assert "val 16 and test 16 images where MedMNIST's record says val 1,712" in err  # the tiny real file
    assert "--n 40: medmnist's dataset classes refuse len()" in err
    ds = medmnist.BloodMNIST(split="train", root=str(tmp_path / "synthetic"), size=64)
    image, label = ds[39]
    assert image.size == (64, 64) and image.mode == "RGB" and 0 <= label[0] < 8
    with pytest.raises(AssertionError):  # medmnist's own count check: what the warning said
        len(ds)
    with np.load(tmp_path / "synthetic" / "bloodmnist_64.npz") as f:
        assert "classifier" in json.loads(str(f["synthetic_about"]))["labels"]
        images, labels = f["train_images"], f["train_labels"][:, 0]
    classifier, _ = features.feature_network(data.Dataset(), str(data_root), torch.device("cpu"), str(feature_cache))
    assert np.array_equal(features.predict(classifier, images)[1].argmax(1).numpy(), labels)


def test_a_multi_label_drop_in(tmp_path, feature_cache):
    real = write_npz(tmp_path / "real" / "chestmnist.npz", (48, 16, 16), "chestmnist", 28)
    train_vae.main(["--dataset", "chestmnist", "--size", "28", "--data-root", str(real.parent), "--device", "cpu",
                    "--epochs", "1", *TINY_VAE, "--out", str(tmp_path / "run")])
    export(tmp_path / "run" / "ckpt.pt", tmp_path / "synthetic", "--n", 32, "--feature-cache", feature_cache)
    ds = medmnist.ChestMNIST(split="test", root=str(tmp_path / "synthetic"), size=28)
    assert ds[0][1].shape == (14,)
    with np.load(tmp_path / "synthetic" / "chestmnist.npz") as f:
        assert f["train_labels"].shape == (32, 14) and set(np.unique(f["train_labels"])) <= {0, 1}
        assert f["train_images"].shape == (32, 28, 28)


def test_class_counts_are_exact_and_in_the_real_shares():
    shares = distances.class_shares(np.array([0] * 50 + [1] * 30 + [2] * 20), 4)
    assert np.bincount(distances.proportional_labels(7, shares), minlength=4).tolist() == [4, 2, 1, 0]
    assert len(distances.proportional_labels(11959, shares)) == 11959


def test_the_real_file_is_never_replaced(ckpts, data_root):
    before = data.md5(data_root / "bloodmnist_64.npz")
    with pytest.raises(errors.UserError, match="is an input of this command"):
        export(ckpts["cgan"], data_root, "--overwrite")
    assert data.md5(data_root / "bloodmnist_64.npz") == before
    with pytest.raises(errors.UserError, match="--class draws one"):
        export(ckpts["cgan"], data_root.parent / "x", "--class", "0")


def test_an_export_is_replaced_only_with_overwrite(ckpts, tmp_path):
    export(ckpts["cgan"], tmp_path, "--n", 16)
    with pytest.raises(errors.UserError, match="already exists"):
        export(ckpts["cgan"], tmp_path, "--n", 16)
    export(ckpts["cgan"], tmp_path, "--n", 16, "--overwrite")
