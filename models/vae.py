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
lands where no image was encoded. After each epoch the VAE fits densities to the encoder means of
the training images (ex-post density estimation, Ghosh et al., 2020): one full-covariance
Gaussian per class, weighted by the class's share ("classes", the default: the eight cell types
form separate clusters, and one Gaussian over all of them puts its mass between them), and one
Gaussian over all codes ("gaussian"). "standard" is the prior the model trained against. Before
fit_prior the fitted densities are N(0, I). Each density has a default temperature, the scale of
its standard normal noise (TEMPERATURES): 1, but 1.2 for the per-class Gaussians, whose middles
the decoder turns into smooth, average cells, while draws a little further out come back with
the texture and variety of real ones (measured: docs/results.md, "Sampling temperature").

Conditioning (num_classes > 0, a CVAE as in Sohn et al., 2015): the encoder sees the label as
constant one-hot planes beside the image channels, and the decoder reads [z, one_hot(y)]. With
class_prior the prior is learned per class, p(z | y) = N(m_y, diag s_y^2), so that the KL term
gathers each class's codes around its own mean instead of one mean for all: z then says which
class it was drawn for, and a decoder that ignores its label inputs still draws the class asked for.

Decoder depth (res_blocks > 0): residual blocks of two 3x3 convolutions at each resolution
before upsampling, so each output pixel sees more than one 4x4 transposed convolution.

Upsampling ("transposed", the default, or "resize"): a 4x4 stride-2 transposed convolution
spreads each input pixel over overlapping 4x4 windows, so even and odd output pixels are sums of
different kernel taps and a flat input comes out as a period-2 grid, the dot texture of the
VAE-GAN's nuclei. "resize" doubles the size by nearest neighbours, then applies a 3x3 convolution
(Odena et al. 2016, "Deconvolution and checkerboard artifacts"): every output pixel is made the
same way, and a flat input stays flat.

VAE-GAN (train_vae.py --adversarial, after Larsen et al. 2016): a PatchDiscriminator learns to
tell training images from their reconstructions, and the VAE's loss gains a term that rewards
reconstructions it takes for real. A squared error only sees the average of what a blurred
detail could be; the discriminator sees that no real cell is blurred. The term is weighed in
the Gaussian likelihood's own units (loss(), `adversarial`), so its pull keeps pace with the
reconstruction's as the variance falls.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LIKELIHOODS = ("bernoulli", "gaussian")
UPSAMPLES = ("transposed", "resize")  # how the decoder doubles its resolution; see the docstring
PRIORS = ("classes", "gaussian", "standard")  # what z is drawn from when sampling; see the docstring
TEMPERATURES = {"classes": 1.2, "gaussian": 1.0, "standard": 1.0}  # each density's default noise scale; see the docstring
VALUE_RANGE = (0.0, 1.0)  # the decoder ends in a Sigmoid


def upsampler(c_in: int, c_out: int, how: str) -> nn.Module:
    """(B, c_in, s, s) -> (B, c_out, 2s, 2s), by one of UPSAMPLES."""
    if how == "transposed":
        return nn.ConvTranspose2d(c_in, c_out, 4, 2, 1)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, 1, 1))


class ResidualBlock(nn.Module):
    """relu(x + conv3x3(relu(conv3x3(x)))): depth at one resolution, shape (B, c, s, s) kept."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, 1, 1), nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class Blur(nn.Module):
    """(B, c, s, s) -> (B, c, s, s): each channel convolved with the 3x3 binomial filter
    [1, 2, 1]^T [1, 2, 1] / 16, edges mirrored."""

    def __init__(self, c: int):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (k[:, None] * k[None, :] / 16).expand(c, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.kernel.to(x.dtype), groups=x.shape[1])


class PatchDiscriminator(nn.Module):
    """images (B, nc, S, S) in [0, 1] [and classes (B,)] -> logits (B, P), one per overlapping
    patch: stride-2 4x4 convolutions of `widths` channels with LeakyReLU, then a 3x3 convolution to
    one logit per position (P = 8 x 8 at 64 pixels with three widths; each sees a patch of 38 x 38
    pixels).

    With num_classes > 0 each logit adds a projection term (Miyato & Koyama 2018), the inner
    product of a learned class embedding with the features at its position: a patch is then judged
    as part of a cell of the given class, so a reconstruction that blurs away what marks its class
    (a basophil's granules) is told apart by that alone.

    With classifier > 0 it also names each image's class (an auxiliary classifier, Odena et al.
    2017): a linear layer on its features, averaged over positions and normalised per image, gives
    class logits (B, classifier); forward(..., named=True) returns (patch logits, class logits),
    as the DCGAN's discriminator does. The VAE-GAN trains it on real
    images and asks the VAE for reconstructions it names as their class: a reconstruction has to
    show what marks its cell type, not only look sharp.

    With blur, every stride-2 layer first low-passes its input with a fixed binomial filter, so
    that detail finer than the layer's stride reaches it as what it is instead of folding onto
    coarser patterns (aliasing; Zhang 2019): a regular dot lattice then looks like one, not like
    the irregular granules of a real cell.

    Every weight of the patch logits is spectrally normalised (Miyato et al. 2018; torch's
    parametrisation) and there is no BatchNorm, so each image's logits depend on that image alone."""

    def __init__(self, nc: int = 3, widths: tuple[int, ...] = (32, 64, 128), num_classes: int = 0,
                 classifier: int = 0, blur: bool = False):
        super().__init__()
        layers, c = [], nc
        for w in widths:  # (B, c, s, s) -> (B, w, s/2, s/2)
            layers += [Blur(c)] if blur else []
            layers += [nn.Conv2d(c, w, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
            c = w
        layers += [nn.Conv2d(c, 1, 3, 1, 1)]
        self.embed = nn.Embedding(num_classes, c) if num_classes else None
        for m in [*layers, self.embed]:
            if isinstance(m, (nn.Conv2d, nn.Embedding)):
                nn.utils.parametrizations.spectral_norm(m)
        self.net = nn.Sequential(*layers)
        # On the small features of spectrally normalised layers a linear head learns the classes,
        # the rare ones most, far slower unless they are normalised per image first (forward;
        # docs/results.md, "D names the class"). No spectral norm on the head: its logits are a
        # cross-entropy's.
        self.classifier = nn.Linear(c, classifier) if classifier else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, named: bool = False):
        h = self.net[:-1](x * 2 - 1)  # centred inputs, as a DCGAN discriminator sees them
        logits = self.net[-1](h).squeeze(1)  # (B, s, s)
        if self.embed is not None:  # (B, C, s, s) . (B, C) over C, at every position
            logits = logits + torch.einsum("bchw,bc->bhw", h, self.embed(y))
        if not named:
            return logits.flatten(1)
        pooled = F.layer_norm(h.mean((2, 3)), h.shape[1:2])  # (B, C)
        return logits.flatten(1), self.classifier(pooled)  # (B, P), (B, classifier)


def gaussian_fit(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and a square root S of the covariance (S @ S.T = cov, (D, D)) of codes (N, D)."""
    codes = codes.double()
    eye = torch.eye(codes.shape[1], dtype=codes.dtype, device=codes.device)
    cov = (torch.cov(codes.T) if len(codes) > 1 else 0 * eye) + 1e-6 * eye  # one code: a point
    scale, info = torch.linalg.cholesky_ex(cov)
    if info:  # not positive definite in floating point (few, nearly collinear codes)
        w, v = torch.linalg.eigh(cov)
        scale = v * w.clamp_min(1e-12).sqrt()
    return codes.mean(0), scale


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor | float = 0.0,
                prior_logvar: torch.Tensor | float = 0.0) -> torch.Tensor:
    """KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)) of diagonal Gaussians, summed over the
    last dimension: 1/2 sum(prior_logvar - logvar + (e^logvar + (mu - prior_mu)^2) / e^prior_logvar - 1).
    With the defaults it is the paper's KL against N(0, I) (Kingma & Welling 2014, Appendix B)."""
    prior_logvar = torch.as_tensor(prior_logvar, dtype=mu.dtype, device=mu.device)
    return 0.5 * torch.sum(prior_logvar - logvar + (logvar.exp() + (mu - prior_mu).pow(2)) / prior_logvar.exp() - 1, -1)


class VAE(nn.Module):
    def __init__(self, latent_dim: int = 128, widths: tuple[int, ...] = (32, 64), nc: int = 3,
                 image_size: int = 64, num_classes: int = 0, likelihood: str = "gaussian",
                 class_prior: bool = False, res_blocks: int = 0, mixture: int = 0,
                 upsample: str = "transposed"):
        """num_classes: the labels that condition the model (0: unconditional); mixture: the
        classes of the data, one Gaussian each in the fitted "classes" density (0: none)."""
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if upsample not in UPSAMPLES:
            raise ValueError(f"upsample must be one of {UPSAMPLES}, got {upsample!r}")
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
            dec += [ResidualBlock(c) for _ in range(res_blocks)] + [upsampler(c, w, upsample), nn.ReLU(True)]
            c = w
        dec += [ResidualBlock(c) for _ in range(res_blocks)]
        dec += [upsampler(c, nc, upsample)]  # logits; the Sigmoid is applied in decode()
        self.decoder = nn.Sequential(*dec)
        self.class_prior = bool(num_classes and class_prior)
        if self.class_prior:  # p(z | y) = N(m_y, diag e^(l_y)), starting as N(0, I) for every class
            self.prior_mu = nn.Parameter(torch.zeros(num_classes, latent_dim))
            self.prior_logvar = nn.Parameter(torch.zeros(num_classes, latent_dim))
        # the fitted densities of z: "gaussian", prior_mean + prior_scale @ eps with eps ~ N(0, I),
        # and "classes", class_means[c] + class_scales[c] @ eps for class c drawn by class_weights
        self.mixture = mixture
        self.register_buffer("prior_mean", torch.zeros(latent_dim))
        self.register_buffer("prior_scale", torch.eye(latent_dim))
        self.register_buffer("class_means", torch.zeros(mixture, latent_dim))
        self.register_buffer("class_scales", torch.eye(latent_dim).repeat(mixture, 1, 1))
        self.register_buffer("class_weights", torch.full((mixture,), 1 / max(mixture, 1)))
        self.density = "classes" if mixture else "gaussian"  # what generate() draws z from, one of PRIORS

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

    @property
    def draws_classes(self) -> bool:
        """Whether generate() takes a class for each draw: a conditional model's, or the classes density's."""
        return self.num_classes > 0 or self.density == "classes"

    @property
    def default_temperature(self) -> float:
        return TEMPERATURES[self.density]

    def generate(self, noise: torch.Tensor, labels: torch.Tensor | None = None,
                 temperature: float | None = None) -> torch.Tensor:
        """Standard normal noise (B, latent_dim) [and classes (B,)] -> images (B, nc, S, S) in [0, 1]:
        the noise scaled by temperature (default: the density's, TEMPERATURES), carried into the
        density named by self.density, decoded."""
        temperature = self.default_temperature if temperature is None else temperature
        return self.decode(self.prior_latents(noise * temperature, self.density, labels), labels)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, eps: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the reconstruction logits, mu and logvar; eps (B, latent_dim) is the posterior
        sample's standard normal noise (drawn here unless given)."""
        mu, logvar = self.encode(x, y)
        return self.decode_logits(self.reparameterize(mu, logvar, eps), y), mu, logvar

    @torch.no_grad()
    def fit_prior(self, mu: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Fit the sampling densities to encoder means mu (N, latent_dim) of training images and
        their labels (N,): one Gaussian to all codes, and one per class (a class without codes
        gets weight 0 and the Gaussian of all codes)."""
        mean, scale = gaussian_fit(mu)
        self.prior_mean.copy_(mean)
        self.prior_scale.copy_(scale)
        if self.mixture and labels is not None:
            counts = torch.bincount(labels, minlength=self.mixture)
            for c in range(self.mixture):
                class_mean, class_scale = gaussian_fit(mu[labels == c]) if counts[c] else (mean, scale)
                self.class_means[c], self.class_scales[c] = class_mean, class_scale
            self.class_weights.copy_(counts / counts.sum())

    def prior(self, y: torch.Tensor | None) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """The mean and log variance of p(z | y) (rows of the learned table), or of N(0, I)."""
        return (self.prior_mu[y], self.prior_logvar[y]) if self.class_prior else (0.0, 0.0)

    def prior_latents(self, eps: torch.Tensor, prior: str = "gaussian", y: torch.Tensor | None = None) -> torch.Tensor:
        """Standard normal eps (..., latent_dim) -> draws of one of PRIORS, of class y (...) for
        "classes" (required) and for "standard" with a learned class prior."""
        if prior == "gaussian":
            return self.prior_mean + eps @ self.prior_scale.T
        if prior == "standard":
            if not self.class_prior:
                return eps
            mean, logvar = self.prior(y)
            return mean + torch.exp(0.5 * logvar) * eps
        if not self.mixture or y is None:
            raise ValueError("the classes density needs a model with mixture > 0 and a class per draw")
        z = torch.empty_like(eps)
        for c in y.unique().tolist():  # class by class: (N, D, D) gathered scales would not fit memory
            m = y == c
            z[m] = self.class_means[c] + eps[m] @ self.class_scales[c].T
        return z

    def loss(self, x: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             y: torch.Tensor | None = None, beta: float = 1.0, batch_mean=torch.mean,
             critic: dict[str, tuple[torch.Tensor, float]] | None = None) -> dict[str, torch.Tensor]:
        """The negative ELBO with a beta-weighted KL; each part summed per image, batch-averaged.

        recon: -log p(x|z). Bernoulli: binary cross-entropy on the logits. Gaussian: with
            sigma^2 = the batch's mean squared error, sum((x - x_hat)^2) / (2 sigma^2) +
            D/2 log(2 pi sigma^2); sigma is held fixed in the gradient, which at the optimum
            changes nothing (d/dsigma = 0 there). batch_mean(squared errors) gives sigma^2; under
            torchrun the training script passes a mean over the global batch of all processes.
        kl: KL(q(z|x) || p(z)) in closed form (gaussian_kl): p(z) = N(0, I), or p(z | y) with a
            learned class prior.
        critic (Gaussian likelihood only): losses that a discriminator gives the
            reconstructions, per image (a VAE-GAN), by name, each with its weight: the adversarial
            term, and the auxiliary classifier's. A term is counted as `weight` squared error on
            every pixel per unit of loss, weight * D * term / (2 sigma^2), so that against the
            reconstruction term its pull does not fade as sigma^2 falls in training.
        """
        b = x.shape[0]
        logits, mu, logvar = logits.float(), mu.float(), logvar.float()  # fp32 sums under autocast
        if self.likelihood == "bernoulli":
            recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / b
        else:
            se = (torch.sigmoid(logits) - x).pow(2)
            var = batch_mean(se.detach()).clamp_min(1e-6)
            recon = (se.sum() / (2 * var) + 0.5 * se.numel() * torch.log(2 * math.pi * var)) / b
        kl = gaussian_kl(mu, logvar, *self.prior(y)).sum() / b
        parts = {"loss": recon + beta * kl, "recon": recon, "kl": kl}
        if critic and self.likelihood != "gaussian":
            raise ValueError("a discriminator's terms are weighed by the Gaussian likelihood's variance")
        for name, (term, weight) in (critic or {}).items():
            parts[name] = term = term.float()
            parts["loss"] = parts["loss"] + weight * x[0].numel() * term / (2 * var)
        return parts


def build(settings: dict, data) -> dict[str, nn.Module]:
    """The networks a run's settings (its config.json, a checkpoint's args) describe, by the names
    its checkpoint gives them, for `data` (a data.Dataset: its size and channels; its classes
    condition the model when the run was --conditional, and give the fitted "classes" density its
    components unless the set is multi-label): the VAE, and with --adversarial its patch
    discriminator (the encoder's widths and one more, twice the last, where the image is large
    enough)."""
    classes = 0 if data.multi_label else data.num_classes
    widths = tuple(settings["widths"])
    networks = {"vae": VAE(settings["latent_dim"], widths, data.channels, data.size,
                           num_classes=classes if settings["conditional"] else 0, likelihood=settings["likelihood"],
                           class_prior=settings["class_prior"], res_blocks=settings["res_blocks"], mixture=classes,
                           upsample=settings["upsample"])}
    if settings["adversarial"]:
        extra = (2 * widths[-1],) if data.size >> len(widths) >= 2 else ()
        networks["critic"] = PatchDiscriminator(data.channels, (*widths, *extra),
                                                data.num_classes if settings["critic_labels"] else 0,
                                                data.num_classes if settings["class_loss"] else 0,
                                                blur=settings["critic_blur"])
    return networks
