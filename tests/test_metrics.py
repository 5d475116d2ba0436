"""evaluation/features.py and distances.py against references and hand-made cases: FID (scipy's sqrtm, the self-distance, its
growth with noise), KID (unbiased: about 0 between two draws of one distribution), precision and
recall on points whose answer is known, SSIM (scikit-image), class shares, and the feature
network's cache (reused for the same file and recipe, retrained for another)."""
import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.metrics import structural_similarity

from evaluation import distances, features
from data import Dataset
from conftest import write_npz
from models.classifier import Classifier
from evaluation.features import random_symmetry


def gaussian(n, d=16, seed=0, shift=0.0):
    """n draws of one correlated Gaussian (the same for every seed), shifted by `shift`."""
    g = torch.Generator().manual_seed(1234)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5 + torch.eye(d, dtype=torch.float64)
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64) @ mix + shift


def test_fid_matches_the_textbook_formula():
    a, b = gaussian(500, seed=0), gaussian(400, seed=1, shift=0.3)
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    root = scipy.linalg.sqrtm(ca @ cb).real
    want = np.sum((a.numpy().mean(0) - b.numpy().mean(0)) ** 2) + np.trace(ca + cb - 2 * root)
    assert distances.fid(a, b) == pytest.approx(want, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise():
    a = gaussian(300)
    assert abs(distances.fid(a, a)) < 1e-6
    noisy = [distances.fid(a, a + s * gaussian(300, seed=7)) for s in (0.1, 0.3, 1.0)]
    assert 0 < noisy[0] < noisy[1] < noisy[2]


def test_kid_is_unbiased_and_sees_a_shift():
    same = [distances.kid(gaussian(400, seed=s), gaussian(400, seed=50 + s), subsets=20, subset_size=200)[0]
            for s in range(5)]
    shifted, std = distances.kid(gaussian(400), gaussian(400, seed=3, shift=0.5), subsets=20, subset_size=200)
    assert abs(np.mean(same)) < 0.1 * shifted  # about 0, not a positive bias
    assert min(same) < 0  # an unbiased estimate dips below 0 when the truth is 0
    assert shifted > 5 * std > 0


def test_precision_and_recall_of_a_hand_made_example():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    # k = 1: each real point's ball reaches 1, so 0.5 is inside and 10 is not
    fake = torch.tensor([[0.5], [10.0]], dtype=torch.float64)
    precision, recall = distances.precision_recall(real, fake, k=1)
    assert precision == 0.5
    assert recall == 1.0  # the two fake points reach 9.5 each way: 0.5's ball covers 0..3
    fake = torch.tensor([[0.0], [0.2], [0.4], [10.0]], dtype=torch.float64)
    # fake radii (k = 1): 0.2, 0.2, 0.2, 9.6 -> 10's ball reaches 0.4..19.6, covering 1, 2, 3 but not 0
    # 0 is covered by the ball at 0.0; so all real points are covered
    assert distances.precision_recall(real, fake, k=1) == (0.75, 1.0)
    fake = torch.tensor([[0.0], [0.1], [0.2], [0.3]], dtype=torch.float64)
    assert distances.precision_recall(real, fake, k=1) == (1.0, 0.25)  # mode collapse: low recall
    with pytest.raises(ValueError):
        distances.precision_recall(real[:1], fake, k=3)


def test_ssim_matches_scikit_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    y = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = distances.ssim(x, y)
    for i in range(2):
        ref = structural_similarity(x[i].numpy(), y[i].numpy(), channel_axis=0, data_range=1.0,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert ours[i].item() == pytest.approx(ref, abs=1e-6)
    assert torch.allclose(distances.ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert distances.psnr(0.01) == pytest.approx(20.0)


def test_class_shares_and_proportional_labels():
    shares = np.array([0.5, 0.25, 0.125, 0.125, 0, 0, 0, 0])
    labels = distances.proportional_labels(10, shares, seed=3)
    assert np.bincount(labels.numpy(), minlength=8).sum() == 10
    assert np.abs(distances.class_shares(labels, 8) - shares).max() <= 0.1
    assert torch.equal(labels, distances.proportional_labels(10, shares, seed=3))


def test_random_symmetry_reaches_all_eight_symmetries():
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(400, 1, 4, 4)
    seen = {tuple(img.flatten().tolist()) for img in random_symmetry(x, torch.Generator().manual_seed(0))}
    assert len(seen) == 8


def test_random_symmetry_is_its_three_coins_as_flips_and_a_transpose():
    """Each image turned as its coins say: columns flipped, rows flipped, transposed, each or not
    (the classifier's augmentation, through utils/augment.py's one symmetry function)."""
    x = torch.randn(64, 3, 8, 8)
    coins = torch.rand(3, 64, generator=torch.Generator().manual_seed(5)) < 0.5
    want = []
    for img, (c0, c1, c2) in zip(x, coins.T.tolist()):
        img = img.flip(2) if c0 else img
        img = img.flip(1) if c1 else img
        want.append(img.transpose(1, 2) if c2 else img)
    assert torch.equal(random_symmetry(x, torch.Generator().manual_seed(5)), torch.stack(want))


def test_classifier_shapes():
    model = Classifier(widths=(8, 16, 16))
    x = torch.randn(5, 3, 64, 64)
    assert model.features(x).shape == (5, 16)
    assert model(x).shape == (5, 8)


TINY_RECIPE = {**features.RECIPE, "widths": [16, 32], "epochs": 2, "batch_size": 16, "lr": 1e-2}


def test_feature_network_is_cached_per_file_and_recipe(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_npz(root / "bloodmnist_64.npz", sizes=(64, 16, 16))
    cache = tmp_path / "features"
    trained = []
    real_train = features.train_classifier
    monkeypatch.setattr(features, "train_classifier", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    first, info = features.feature_network(Dataset(), str(root), torch.device("cpu"), str(cache), TINY_RECIPE)
    assert len(trained) == 1 and 0 <= info["test_accuracy"] <= 1
    assert len(list(cache.glob("*.pt"))) == 1 and len(list(cache.glob("*.json"))) == 1
    again, _ = features.feature_network(Dataset(), str(root), torch.device("cpu"), str(cache), TINY_RECIPE)
    assert len(trained) == 1  # reloaded, not retrained
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    torch.testing.assert_close(features.predict(first, x)[0], features.predict(again, x)[0])
    features.feature_network(Dataset(), str(root), torch.device("cpu"), str(cache), {**TINY_RECIPE, "epochs": 1})
    assert len(trained) == 2  # another recipe retrains
    write_npz(root / "bloodmnist_64.npz", sizes=(48, 16, 16))  # another data file: another key
    features.feature_network(Dataset(), str(root), torch.device("cpu"), str(cache), TINY_RECIPE)
    assert len(trained) == 3 and len(list(cache.glob("*.pt"))) == 2


def test_classifier_learns_the_tiny_classes(tmp_path):
    """The recipe works: on the tiny coloured discs it beats chance (1/8) by far."""
    root = tmp_path / "data"
    write_npz(root / "bloodmnist_64.npz", sizes=(128, 16, 64))
    _, info = features.feature_network(Dataset(), str(root), torch.device("cpu"), str(tmp_path / "cache"),
                                      {**TINY_RECIPE, "epochs": 8})
    assert info["test_accuracy"] > 0.6


def test_random_symmetry_keeps_what_the_dataset_allows():
    """A dataset with an up is mirrored left to right at most (and half the time), one with a side
    too is never turned."""
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(400, 1, 4, 4)
    mirrored = random_symmetry(x, torch.Generator().manual_seed(0), "flip")
    assert {tuple(img.flatten().tolist()) for img in mirrored} == {tuple(x[0].flatten().tolist()),
                                                                   tuple(x[0].flip(2).flatten().tolist())}
    assert 150 < (mirrored != x).flatten(1).any(1).sum() < 250
    assert torch.equal(random_symmetry(x, torch.Generator().manual_seed(0), "none"), x)
