"""A convolutional variational autoencoder (Kingma & Welling, 2014).

Encoder: stride-2 convolutions (one per entry of `widths`) -> two linear heads for mu and
log sigma^2. Decoder: linear -> stride-2 transposed convolutions back to (nc, S, S) -> Sigmoid.
Images are in [0, 1]. The likelihood p(x|z) is either Bernoulli per pixel, as in the paper's MNIST
experiments, or Gaussian with one variance for all pixels set to its maximum-likelihood value, the
mean squared error of the batch (the "optimal sigma" decoder of Rybkin et al., 2021). On
continuous colour images the Bernoulli's fixed, wide noise lets the model ignore detail; the
calibrated Gaussian weighs reconstruction as sharply as the decoder can currently reconstruct.

Sampling: the KL term pulls the codes towards N(0, I) but, with a sharp likelihood, does not get
them there (for the default model the codes' mean has norm about 4), so decoding N(0, I) draws
lands where no image was encoded. After training the VAE fits a full-covariance Gaussian to the
encoder means of the training images (ex-post density estimation, Ghosh et al., 2020) and draws
its samples from it; before fit_prior it is N(0, I).

Conditioning (num_classes > 0, a CVAE as in Sohn et al., 2015): the encoder sees the label as
constant one-hot planes beside the image channels, and the decoder reads [z, one_hot(y)].
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LIKELIHOODS = ("bernoulli", "gaussian")
VALUE_RANGE = (0.0, 1.0)  # the decoder ends in a Sigmoid


class VAE(nn.Module):
    def __init__(self, latent_dim: int = 128, widths: tuple[int, ...] = (32, 64), nc: int = 3,
                 image_size: int = 64, num_classes: int = 0, likelihood: str = "gaussian"):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.num_classes, self.likelihood = num_classes, likelihood
        if image_size % 2 ** len(widths):
            raise ValueError(f"image_size {image_size} is not divisible by 2**{len(widths)}")
        self.latent_dim = latent_dim
        self.bottom = (widths[-1], image_size // 2 ** len(widths), image_size // 2 ** len(widths))
        features = widths[-1] * self.bottom[1] * self.bottom[2]  # 64 * 16 * 16 for the defaults

        enc, c = [], nc + num_classes
        for w in widths:  # (B, c, s, s) -> (B, w, s/2, s/2)
            enc += [nn.Conv2d(c, w, 4, 2, 1), nn.ReLU(True)]
            c = w
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        self.fc_mu = nn.Linear(features, latent_dim)
        self.fc_logvar = nn.Linear(features, latent_dim)

        self.fc_decode = nn.Linear(latent_dim + num_classes, features)
        dec = []
        for w in reversed(widths[:-1]):  # (B, c, s, s) -> (B, w, 2s, 2s)
            dec += [nn.ConvTranspose2d(c, w, 4, 2, 1), nn.ReLU(True)]
            c = w
        dec += [nn.ConvTranspose2d(c, nc, 4, 2, 1)]  # logits; the Sigmoid is applied in decode()
        self.decoder = nn.Sequential(*dec)
        # the sampling distribution of z: prior_mean + prior_scale @ eps, eps ~ N(0, I)
        self.register_buffer("prior_mean", torch.zeros(latent_dim))
        self.register_buffer("prior_scale", torch.eye(latent_dim))

    def _one_hot(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, self.num_classes).to(like.dtype)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, nc, S, S) in [0, 1] -> mu, logvar, each (B, latent_dim)."""
        if self.num_classes:  # (B, nc + classes, S, S)
            planes = self._one_hot(y, x)[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, planes], 1)
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """z = mu + sigma * eps with eps ~ N(0, I) (drawn here unless given), so gradients reach
        mu and logvar."""
        eps = torch.randn_like(mu) if eps is None else eps
        return mu + torch.exp(0.5 * logvar) * eps

    def decode_logits(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, latent_dim) -> pixel logits (B, nc, S, S)."""
        if self.num_classes:
            z = torch.cat([z, self._one_hot(y, z)], 1)
        h = F.relu(self.fc_decode(z)).view(z.shape[0], *self.bottom)
        return self.decoder(h)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """z (B, latent_dim) -> images (B, nc, S, S) in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z, y))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, eps: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the reconstruction logits, mu and logvar; eps (B, latent_dim) is the posterior
        sample's standard normal noise (drawn here unless given)."""
        mu, logvar = self.encode(x, y)
        return self.decode_logits(self.reparameterize(mu, logvar, eps), y), mu, logvar

    @torch.no_grad()
    def fit_prior(self, mu: torch.Tensor) -> None:
        """Fit the sampling Gaussian to encoder means mu (N, latent_dim) of training images."""
        mu = mu.double()
        eye = torch.eye(mu.shape[1], dtype=mu.dtype, device=mu.device)
        cov = (torch.cov(mu.T) if len(mu) > 1 else 0 * eye) + 1e-6 * eye  # one code: a point
        scale, info = torch.linalg.cholesky_ex(cov)
        if info:  # not positive definite in floating point (few, nearly collinear codes)
            w, v = torch.linalg.eigh(cov)
            scale = v * w.clamp_min(1e-12).sqrt()  # another square root: scale @ scale.T = cov
        self.prior_mean.copy_(mu.mean(0))
        self.prior_scale.copy_(scale)

    def prior_latents(self, eps: torch.Tensor) -> torch.Tensor:
        """Standard normal eps (B, latent_dim) -> draws of the fitted Gaussian (B, latent_dim)."""
        return self.prior_mean + eps @ self.prior_scale.T

    def loss(self, x: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             beta: float = 1.0, batch_mean=torch.mean) -> dict[str, torch.Tensor]:
        """The negative ELBO with a beta-weighted KL; each part summed per image, batch-averaged.

        recon: -log p(x|z). Bernoulli: binary cross-entropy on the logits. Gaussian: with
            sigma^2 = the batch's mean squared error, sum((x - x_hat)^2) / (2 sigma^2) +
            D/2 log(2 pi sigma^2); sigma is held fixed in the gradient, which at the optimum
            changes nothing (d/dsigma = 0 there). batch_mean(squared errors) gives sigma^2; under
            torchrun the training script passes a mean over the global batch of all processes.
        kl: KL(q(z|x) || N(0, I)) in closed form, Kingma & Welling 2014, Appendix B:
            -1/2 * sum(1 + log sigma^2 - mu^2 - sigma^2).
        """
        b = x.shape[0]
        logits, mu, logvar = logits.float(), mu.float(), logvar.float()  # fp32 sums under autocast
        if self.likelihood == "bernoulli":
            recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / b
        else:
            se = (torch.sigmoid(logits) - x).pow(2)
            var = batch_mean(se.detach()).clamp_min(1e-6)
            recon = (se.sum() / (2 * var) + 0.5 * se.numel() * torch.log(2 * math.pi * var)) / b
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / b
        return {"loss": recon + beta * kl, "recon": recon, "kl": kl}


def build(settings: dict, num_classes: int) -> VAE:
    """The VAE a run's settings (its config.json, a checkpoint's args) describe; the
    `num_classes` labels condition it when the run was --conditional."""
    return VAE(settings["latent_dim"], tuple(settings["widths"]), num_classes=num_classes if settings["conditional"] else 0,
               likelihood=settings["likelihood"])
