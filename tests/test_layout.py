"""The house: the top level holds the scripts a user runs and data.py; every package imports only
what lies below it (evaluation -> utils -> data.py -> system, models at the bottom) and no
package imports a script; the GAN and the VAE draw through one interface."""
import ast
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from models.dcgan import Generator
from models.vae import VAE
from utils.sampling import draw, fixed_noise

SCRIPTS = {"train_gan", "train_vae", "sample", "evaluate", "bench"}
# each package, and what it may import of this repo
BELOW = {"models": set(), "system": set(), "data": {"system"}, "utils": {"system", "data", "models"},
         "evaluation": {"system", "data", "models", "utils"}}


def imported(path: Path) -> set[str]:
    """The top-level names of this repo's modules and packages that `path` imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & (SCRIPTS | set(BELOW))


def test_the_top_level_holds_the_scripts_and_data_only():
    assert {p.stem for p in ROOT.glob("*.py")} == SCRIPTS | {"data"}


@pytest.mark.parametrize("package", sorted(BELOW))
def test_a_package_imports_only_what_lies_below_it(package):
    files = [ROOT / "data.py"] if package == "data" else sorted((ROOT / package).glob("*.py"))
    for path in files:
        wrong = imported(path) - BELOW[package] - {package}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


@pytest.mark.parametrize("model", [Generator(nz=12, ngf=8, nc=1, image_size=28, num_classes=3, labels="batchnorm"),
                                   VAE(latent_dim=12, widths=(8, 16), nc=1, image_size=28, num_classes=3, mixture=3)],
                         ids=["gan", "vae"])
def test_both_families_draw_through_one_interface(model):
    """latent_dim, draws_classes and generate(noise, labels, temperature): images in [0, 1]; the
    temperature's default is the model's own; drawn in batches, the same images as at once."""
    model.eval()
    assert model.latent_dim == 12 and model.draws_classes
    noise, labels = fixed_noise(10, 12, 0, torch.device("cpu")), torch.arange(10) % 3
    with torch.no_grad():
        images = model.generate(noise, labels)
        assert images.shape == (10, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
        assert torch.equal(images, model.generate(noise, labels, model.default_temperature))
        assert not torch.allclose(images, model.generate(noise, labels, 0.5))
    torch.testing.assert_close(draw(model, noise, labels, batch_size=3), images.clamp(0, 1), atol=1e-6, rtol=0)
    as_uint8 = draw(model, noise, labels, uint8=True)
    assert as_uint8.dtype == torch.uint8 and (as_uint8.float() / 255 - images).abs().max() <= 0.5 / 255 + 1e-6
