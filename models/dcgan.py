"""DCGAN generator and discriminator (Radford, Metz & Chintala, 2016).

The generator maps z of size `nz` to an image by doubling the resolution from 4x4 with strided
transposed convolutions; the discriminator mirrors it and ends in one logit per image. Both work
for any power-of-two image size from 16 up; BloodMNIST here is 64x64, which gives the classic
4 -> 8 -> 16 -> 32 -> 64 stack.
"""
import math

import torch
import torch.nn as nn


def _num_doublings(image_size: int) -> int:
    """How many stride-2 layers take 4x4 to image_size (4 for 64x64)."""
    n = int(math.log2(image_size)) - 2
    if image_size < 16 or 2 ** (n + 2) != image_size:
        raise ValueError(f"image_size must be a power of two >= 16, got {image_size}")
    return n


def init_dcgan_weights(module: nn.Module) -> None:
    # Radford et al. 2016, section 4: weights from N(0, 0.02); BatchNorm scale from N(1, 0.02).
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """z (B, nz) -> images (B, nc, image_size, image_size) in [-1, 1]."""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3, image_size: int = 64):
        super().__init__()
        self.nz = nz
        n = _num_doublings(image_size)
        width = ngf * 2 ** (n - 1)  # 512 for ngf=64 at 64x64
        # (B, nz, 1, 1) -> (B, width, 4, 4)
        layers = [nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False),
                  nn.BatchNorm2d(width), nn.ReLU(True)]
        for _ in range(n - 1):  # each block halves the width and doubles the resolution
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(width // 2), nn.ReLU(True)]
            width //= 2
        # (B, ngf, S/2, S/2) -> (B, nc, S, S)
        layers += [nn.ConvTranspose2d(width, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    """images (B, nc, image_size, image_size) -> logits (B,). No sigmoid: use BCE-with-logits."""

    def __init__(self, ndf: int = 64, nc: int = 3, image_size: int = 64):
        super().__init__()
        n = _num_doublings(image_size)
        # (B, nc, S, S) -> (B, ndf, S/2, S/2); no BatchNorm on the input layer (Radford et al.)
        layers = [nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        width = ndf
        for _ in range(n - 1):  # each block doubles the width and halves the resolution
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),
                       nn.BatchNorm2d(width * 2), nn.LeakyReLU(0.2, inplace=True)]
            width *= 2
        # (B, ndf * 2**(n-1), 4, 4) -> (B, 1, 1, 1)
        layers += [nn.Conv2d(width, 1, 4, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()
