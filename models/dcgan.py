"""DCGAN generator and discriminator (Radford, Metz & Chintala, 2016), with the options a user
reaches for next: class conditioning, a critic without BatchNorm for WGAN-GP, and the losses.

The generator maps z of size `nz` to an image by doubling the resolution from 4x4 with strided
transposed convolutions; the discriminator mirrors it and ends in one logit per image. Both work
for any power-of-two image size from 16 up; BloodMNIST here is 64x64, which gives the classic
4 -> 8 -> 16 -> 32 -> 64 stack.

Conditioning (num_classes > 0): the generator reads [z, one_hot(y)]; the discriminator adds a
projection term <embed(y), pooled features> to its logit (Miyato & Koyama, 2018).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("bce", "hinge", "wgan-gp")
VALUE_RANGE = (-1.0, 1.0)  # the generator ends in Tanh


def _num_doublings(image_size: int) -> int:
    """How many stride-2 layers take 4x4 to image_size (4 for 64x64)."""
    n = int(math.log2(image_size)) - 2
    if image_size < 16 or 2 ** (n + 2) != image_size:
        raise ValueError(f"image_size must be a power of two >= 16, got {image_size}")
    return n


def _norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm mixes the samples of a batch, which the gradient penalty of WGAN-GP forbids;
    'layer' normalises each sample on its own (GroupNorm with one group)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be batch, layer or none, got {kind!r}")


def init_dcgan_weights(module: nn.Module) -> None:
    # Radford et al. 2016, section 4: weights from N(0, 0.02); BatchNorm scale from N(1, 0.02).
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """z (B, nz) [, labels (B,)] -> images (B, nc, image_size, image_size) in [-1, 1]."""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3, image_size: int = 64,
                 num_classes: int = 0):
        super().__init__()
        self.nz, self.num_classes = nz, num_classes
        n = _num_doublings(image_size)
        width = ngf * 2 ** (n - 1)  # 512 for ngf=64 at 64x64
        # (B, nz + classes, 1, 1) -> (B, width, 4, 4)
        layers = [nn.ConvTranspose2d(nz + num_classes, width, 4, 1, 0, bias=False),
                  nn.BatchNorm2d(width), nn.ReLU(True)]
        for _ in range(n - 1):  # each block halves the width and doubles the resolution
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(width // 2), nn.ReLU(True)]
            width //= 2
        # (B, ngf, S/2, S/2) -> (B, nc, S, S)
        layers += [nn.ConvTranspose2d(width, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            z = torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], 1)
        return self.net(z.view(z.shape[0], -1, 1, 1))


class Discriminator(nn.Module):
    """images (B, nc, S, S) [, labels (B,)] -> logits (B,). No sigmoid: the losses take logits.

    norm="batch" is the DCGAN discriminator; "layer" or "none" make a WGAN-GP critic.
    """

    def __init__(self, ndf: int = 64, nc: int = 3, image_size: int = 64, num_classes: int = 0,
                 norm: str = "batch"):
        super().__init__()
        n = _num_doublings(image_size)
        # (B, nc, S, S) -> (B, ndf, S/2, S/2); no normalisation on the input layer (Radford et al.)
        layers = [nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        width = ndf
        for _ in range(n - 1):  # each block doubles the width and halves the resolution
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=norm == "none"),
                       _norm(norm, width * 2), nn.LeakyReLU(0.2, inplace=True)]
            width *= 2
        self.features = nn.Sequential(*layers)  # (B, ndf * 2**(n-1), 4, 4)
        self.out = nn.Conv2d(width, 1, 4, 1, 0, bias=False)  # (B, 1, 1, 1)
        self.embed = nn.Embedding(num_classes, width) if num_classes else None
        self.apply(init_dcgan_weights)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x)
        logits = self.out(h).flatten()
        if self.embed is not None:  # projection: (B, C) . (B, C) summed over C
            logits = logits + (self.embed(y) * h.sum((2, 3))).sum(1)
        return logits


def discriminator_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """D's loss from its logits on real and generated images (the penalty is added separately).
    Computed in fp32 whatever precision the logits came in."""
    real, fake = real.float(), fake.float()
    if kind == "bce":  # -log D(x) - log(1 - D(G(z))), with D = sigmoid(logit)
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "hinge":  # Lim & Ye 2017
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "wgan-gp":  # the negated Wasserstein estimate (Arjovsky et al. 2017)
        return fake.mean() - real.mean()
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def generator_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """G's loss from D's logits on generated images; for bce the non-saturating -log D(G(z))."""
    fake = fake.float()
    return F.softplus(-fake).mean() if kind == "bce" else -fake.mean()


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     y: torch.Tensor | None = None, mix: torch.Tensor | None = None) -> torch.Tensor:
    """Gulrajani et al. 2017, eq. 3: E[(||grad_x D(x_hat)||_2 - 1)^2] at random interpolates
    x_hat = mix * real + (1 - mix) * fake, mix (B, 1, 1, 1) ~ U[0, 1] per image (drawn here unless given).

    The inner gradient is taken with autograd.grad(create_graph=True) and the caller runs one
    ordinary backward() of its loss: that is the pattern DistributedDataParallel supports
    (pytorch/pytorch#63812), since the per-image gradients never reach DDP's all-reduce hooks
    and the final backward() carries the penalty's gradients to them like any other term."""
    if mix is None:
        mix = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (mix * real + (1 - mix) * fake).requires_grad_(True)
    out = critic(x_hat, y) if y is not None else critic(x_hat)
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return ((grad.float().flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def build(settings: dict, num_classes: int) -> tuple[Generator, Discriminator]:
    """The networks a run's settings (its config.json, a checkpoint's args) describe; the
    `num_classes` labels condition them when the run was --conditional."""
    classes = num_classes if settings["conditional"] else 0
    G = Generator(settings["nz"], settings["ngf"], num_classes=classes)
    D = Discriminator(settings["ndf"], num_classes=classes, norm="layer" if settings["loss"] == "wgan-gp" else "batch")
    return G, D
