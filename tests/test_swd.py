"""The sliced Wasserstein distance on Laplacian-pyramid patches (evaluation/patches.py): the 1-D
distance against scipy's, the pyramid against its own reconstruction, and the measure's reference
properties: zero for identical sets, the same in any order of images, growing with blur and with
noise at the fine scales and with a shift of colour at the coarse one."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import wasserstein_distance

from conftest import make_images
from data import as_tensor
from evaluation import patches


@pytest.fixture(scope="module")
def images():
    return as_tensor(make_images(96, seed=3)[0])


def test_one_dimension_is_the_wasserstein_distance():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, 500), rng.gamma(2, 1, 500)
    ours = patches.sliced_wasserstein(torch.tensor(a)[:, None], torch.tensor(b)[:, None], count=8)
    assert ours == pytest.approx(wasserstein_distance(a, b), rel=1e-9)


def test_the_pyramid_adds_back_up_to_the_image(images):
    x = images.float() / 127.5 - 1
    levels = patches.laplacian_pyramid(x)
    assert [lv.shape[-1] for lv in levels] == [64, 32, 16]
    image = levels[-1]
    for detail in reversed(levels[:-1]):
        image = detail + F.interpolate(image, size=detail.shape[-2:], mode="bilinear", align_corners=False)
    assert torch.allclose(image, x, atol=1e-5)
    assert patches.sizes(28) == [28, 14] and patches.sizes(224) == [224, 112, 56, 28, 14]


def test_zero_for_identical_sets_and_the_same_in_any_order(images):
    ref = patches.Reference(images)
    assert ref.swd(images) == [0.0, 0.0, 0.0]
    shuffled = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(1))]
    assert ref.swd(shuffled) == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)
    other = as_tensor(make_images(96, seed=4)[0])  # the same kind of images, other draws
    assert min(ref.swd(other)) > 0


def blurred(images, sigma):
    t = torch.arange(-4, 5, dtype=torch.float32)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 9, 9)
    return F.conv2d(F.pad(images.float(), (4, 4, 4, 4), mode="replicate"), k, groups=3).round().to(torch.uint8)


def test_growing_with_blur_noise_and_a_colour_shift(images):
    ref = patches.Reference(images)
    finest = [ref.swd(blurred(images, s))[0] for s in (0.5, 1.0, 2.0)]
    assert finest[0] < finest[1] < finest[2]
    g = torch.Generator().manual_seed(0)
    noisy = [ref.swd((images.float() + s * torch.randn(images.shape, generator=g)).clamp(0, 255).to(torch.uint8))[0]
             for s in (2, 8, 32)]
    assert noisy[0] < noisy[1] < noisy[2]
    darker = ref.swd((images.float() * 0.8).to(torch.uint8))
    assert darker[-1] > 5 * darker[0]  # the whole image's colour lives at the coarsest scale
