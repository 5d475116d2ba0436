"""Drawing from a trained generator, GAN or VAE alike, through the interface both models offer:
`model.latent_dim`, `model.draws_classes` (whether each draw takes a class) and
`model.generate(noise, labels, temperature) -> images in [0, 1]`.

    trained = checkpoint.load_trained("outputs/gan/ckpt.pt", device)
    images = draw(trained.model, fixed_noise(64, trained.model.latent_dim, 0, device))
"""
import torch
from tqdm import tqdm

from data import to_uint8
from system import errors


def fixed_noise(n: int, dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """n standard normal draws of size dim, the same on every device for a given seed: the noise
    of every epoch's sample grid, and of sample.py's and evaluate.py's draws."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)).to(device)


def use_density(model: torch.nn.Module, density: str | None) -> None:
    """--prior: the VAE's latent density to draw from (models/vae.py PRIORS); None keeps its own
    ("classes" where the model has classes, else "gaussian"). A GAN draws from N(0, I) alone."""
    if density is None or not hasattr(model, "density"):
        return
    if density == "classes" and not model.mixture:
        raise errors.UserError("--prior classes: the data set is multi-label, so its codes have no one class "
                               "each to fit a Gaussian to; use --prior gaussian")
    model.density = density


def class_draws(model: torch.nn.Module, n: int, seed: int) -> torch.Tensor | None:
    """n classes in the training shares the model learned (the VAE's class mixture weights),
    seeded, for a model that draws by class without a condition; None for any other."""
    if model.num_classes or not model.draws_classes:
        return None
    g = torch.Generator().manual_seed(seed + 3)  # not the noise's stream: classes independent of it
    return torch.multinomial(model.class_weights.cpu(), n, replacement=True, generator=g).to(model.class_weights.device)


@torch.no_grad()
def draw(model: torch.nn.Module, noise: torch.Tensor, labels: torch.Tensor | None = None,
         temperature: float | None = None, batch_size: int = 256, uint8: bool = False,
         desc: str | None = None) -> torch.Tensor:
    """model.generate over noise (N, latent_dim) [and labels (N,)] in batches: images (N, C, S, S)
    in [0, 1], or as uint8 0..255 (a quarter of the memory, for large exports). `desc` shows a
    progress bar."""
    parts = []
    for i in tqdm(range(0, len(noise), batch_size), desc=desc, disable=desc is None, leave=False, dynamic_ncols=True):
        images = model.generate(noise[i:i + batch_size], None if labels is None else labels[i:i + batch_size],
                                temperature)
        parts.append(to_uint8(images, (0.0, 1.0)) if uint8 else images.clamp(0, 1))
    return torch.cat(parts)
