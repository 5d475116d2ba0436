"""A checkpoint's generator behind one interface: the GAN's G (its EMA unless told otherwise) or
the VAE's decoder with one of its latent densities, rebuilt from the settings the checkpoint
holds. sample.py draws pictures and datasets with it, evaluate.py scores it."""
import torch
from tqdm import tqdm

from utils import checkpoint, errors, loop
from data import dataset_of, to_uint8
from models import dcgan, vae
from models.vae import PRIORS, TEMPERATURES


class Sampler:
    """A checkpoint's generator (the GAN's G, or the VAE's decoder) behind one interface."""

    def __init__(self, path: str, device: torch.device, use_ema: bool = True, prior: str | None = None,
                 temperature: float | None = None):
        """prior: the VAE's latent density (models/vae.py PRIORS); None: "classes" where the model
        has them, else "gaussian" (a multi-label set has no classes to draw by). temperature scales
        the standard normal noise every draw starts from: below 1, draws keep nearer the density's
        mean (the GAN's z nearer 0), trading variety for typical images; None: the density's
        default (models/vae.py TEMPERATURES), 1 for a GAN."""
        ckpt = checkpoint.load_checkpoint(path, map_location=device)
        self.kind, self.args, self.device = ckpt["kind"], ckpt["args"], device
        self.epochs_trained = ckpt["epoch"]  # finished epochs, which may be fewer than args["epochs"]
        self.conditional = bool(self.args.get("conditional"))
        self.data_root = self.args.get("data_root", "data")  # what it was trained on
        self.data = dataset_of(self.args)
        self.has_ema, self.prior = False, None
        with checkpoint.from_checkpoint(path):
            if self.kind == "gan":
                self.model, _ = dcgan.build(self.args, self.data)
                self.has_ema = "G_ema" in ckpt["models"]
                key = "G_ema" if use_ema and self.has_ema else "G"
                self.model.load_state_dict(ckpt["models"][key])
                self.latent_dim = self.args["nz"]
            else:
                self.model = vae.build(self.args, self.data)
                self.model.load_state_dict(ckpt["models"]["vae"])
                self.latent_dim = self.args["latent_dim"]
                if prior is None:
                    prior = "classes" if self.model.mixture else "gaussian"
                if prior not in PRIORS:
                    raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
                if prior == "classes" and not self.model.mixture:
                    raise errors.UserError(f"--prior classes: {self.data.name} is multi-label, so its codes have no "
                                           "one class each to fit a Gaussian to; use --prior gaussian")
                self.prior = prior
        self.default_temperature = TEMPERATURES[self.prior] if self.kind == "vae" else 1.0
        self.temperature = self.default_temperature if temperature is None else temperature
        self.model.to(device).eval()
        self.ema = self.has_ema and use_ema  # drawing from the averaged generator
        # draws that come with a class: a conditional model's, and the VAE's per-class density
        self.labelled = self.conditional or self.prior == "classes"

    def labels(self, n: int, seed: int) -> torch.Tensor | None:
        """n classes drawn in the training shares the model learned (the VAE's class mixture
        weights), seeded; None where the model has no such shares."""
        if self.prior != "classes":
            return None
        g = torch.Generator().manual_seed(seed + 3)  # not the latents' stream: classes independent of eps
        return torch.multinomial(self.model.class_weights.cpu(), n, replacement=True, generator=g).to(self.device)

    def latents(self, n: int, seed: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """n latents (of classes y (n,) where the density has classes), the same on every device
        for a given seed: standard normal for a GAN, the chosen density for a VAE."""
        return self.to_latent(loop.fixed_noise(n, self.latent_dim, seed, self.device), y)

    def to_latent(self, eps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Standard normal draws (..., latent_dim) [of classes y (...)] -> the model's latent
        distribution, at the sampler's temperature."""
        eps = eps * self.temperature
        return eps if self.kind == "gan" else self.model.prior_latents(eps, self.prior, y)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, y: torch.Tensor | None, batch_size: int = 256,
               uint8: bool = False, desc: str | None = None) -> torch.Tensor:
        """Latents (N, latent_dim) [and labels (N,)] -> images (N, C, S, S) in [0, 1], or as
        uint8 0..255 (a quarter of the memory, for large exports)."""
        y = y if self.conditional else None
        parts = []
        for i in tqdm(range(0, len(z), batch_size), desc=desc, disable=desc is None, leave=False, dynamic_ncols=True):
            zi, yi = z[i:i + batch_size], None if y is None else y[i:i + batch_size]
            images = self.model(zi, yi) * 0.5 + 0.5 if self.kind == "gan" else self.model.decode(zi, yi)
            parts.append(to_uint8(images, (0.0, 1.0)) if uint8 else images.clamp(0, 1))
        return torch.cat(parts)
