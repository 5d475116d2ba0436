"""Differentiable augmentation for GANs on small data (DiffAugment, Zhao et al. 2020).

With some 12,000 training images a discriminator soon memorises the real set, and then stops
teaching the generator. Augmenting what D sees makes memorising harder, but only if real and
generated images are augmented alike (else D learns to spot the augmentation, and G learns to
make it), and in both of D's and G's steps, so the operations must be differentiable: G's
gradient passes through them. Each operation keeps a cell a cell of the same type:

    symmetry     one of the 8 rotations and flips of the square (a blood cell has no up or left)
    flip         a left-right mirror, half the time (an OCT scan has an up, but either side)
    translation  a shift by up to 1/8 of the image, the gap filled with zeros (mid-grey)
    color        brightness, saturation and contrast, each scaled at random (Zhao et al.'s ranges)
    cutout       a square of half the image's side set to zero, at a random place

Images are (B, C, H, W) in [-1, 1]. Every image gets its own random parameters, drawn for the
global batch and cut to this process's rows (distributed.batch_noise), so a run's augmentations
depend on its seed alone, resume exactly and do not depend on the number of processes.
"""
import argparse
import functools

import torch
import torch.nn.functional as F

from system import distributed


def parse_policy(text: str) -> tuple[str, ...]:
    """'translation,color' -> ('translation', 'color'); 'none' or '' -> (); 'all' -> ALL."""
    if text in ("", "none"):
        return ()
    names = ALL if text == "all" else tuple(t.strip() for t in text.split(","))
    unknown = [n for n in names if n not in OPERATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r}; choose from {', '.join(OPERATIONS)}, "
                         "'all' or 'none'")
    return names


def policy(text: str) -> str:
    """--augment as argparse reads it: checked, and spelled one way ('none', 'all', or the
    operations in order)."""
    try:
        ops = parse_policy(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return "none" if not ops else "all" if ops == parse_policy("all") else ",".join(ops)


def augment(x: torch.Tensor, policy: tuple[str, ...], u: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, C, H, W) -> the same images augmented by each operation of `policy` in turn. u
    (B, draws(policy)) holds the uniform numbers in [0, 1) that set each image's parameters;
    without it they are drawn here, for the global batch under torchrun."""
    if not policy:
        return x
    if u is None:
        u = distributed.batch_noise(torch.rand, x.shape[0], draws(policy), device=x.device)
    u = u.to(x.dtype)
    for name in policy:
        operation, n = OPERATIONS[name]
        x, u = operation(x, u[:, :n]), u[:, n:]
    return x


def draws(policy: tuple[str, ...]) -> int:
    """Uniform numbers the policy takes per image."""
    return sum(OPERATIONS[name][1] for name in policy)


def symmetry(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Image i under symmetry k = floor(8 u_i), one of the 8 uniformly."""
    return turn(x, (u[:, 0] * 8).long().clamp(0, 7))


def flip(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Image i mirrored left to right where u_i >= 1/2 (symmetry 4), else as it is."""
    return turn(x, 4 * (u[:, 0] * 2).long().clamp(0, 1))


def turn(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Image i under symmetry k_i (0..7) of the square, as symmetry_sources numbers them. Images
    are square (H == W), as every MedMNIST image is.

    Each symmetry only moves pixels, so it is one gather of each image's pixels from the places
    symmetry_sources(k) names: one operation on the device, in whichever memory format x is,
    with no step that waits to learn which image takes which turn."""
    n, c, h, w = x.shape
    sources = symmetry_sources(h, x.device)[k]  # (B, H*W)
    if x.is_contiguous(memory_format=torch.channels_last):  # pixels (B, H*W, C), a view
        moved = x.permute(0, 2, 3, 1).reshape(n, h * w, c).gather(1, sources[:, :, None].expand(-1, -1, c))
        return moved.view(n, h, w, c).permute(0, 3, 1, 2)
    return x.reshape(n, c, h * w).gather(2, sources[:, None, :].expand(-1, c, -1)).view(n, c, h, w)


@functools.cache  # one table per image size and device
def symmetry_sources(size: int, device: torch.device) -> torch.Tensor:
    """(8, size * size): for symmetry k, the flat index of the pixel that lands at each place.

    Symmetry k is three steps, each taken or not, in order: transpose H and W (odd k), flip the
    rows (k = 1, 2, 5, 6), flip the columns (k = 2..5)."""
    turned = []
    for k in range(8):
        places = torch.arange(size * size).view(size, size)
        places = places.t() if k % 2 == 1 else places
        places = places.flip(0) if (k + 1) // 2 % 2 == 1 else places
        turned.append((places.flip(1) if 2 <= k <= 5 else places).flatten())
    return torch.stack(turned).to(device)


def translation(x: torch.Tensor, u: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Each image shifted by whole pixels, up to ratio x its size in each direction; the pixels
    shifted in are zero."""
    h, w = x.shape[2:]
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = (u[:, 0] * (2 * sy + 1)).long().clamp(max=2 * sy) - sy  # -sy..sy
    dx = (u[:, 1] * (2 * sx + 1)).long().clamp(max=2 * sx) - sx
    rows = torch.arange(h, device=x.device)[None, :] - dy[:, None] + sy  # (B, H) into the padded image
    cols = torch.arange(w, device=x.device)[None, :] - dx[:, None] + sx  # (B, W)
    padded = F.pad(x, (sx, sx, sy, sy))
    picked = padded.gather(2, rows[:, None, :, None].expand(-1, x.shape[1], -1, padded.shape[3]))
    return picked.gather(3, cols[:, None, None, :].expand(-1, x.shape[1], h, -1))


def color(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Brightness + [-0.5, 0.5), saturation x [0, 2), contrast x [0.5, 1.5) (Zhao et al.'s
    ranges for images in [-1, 1])."""
    shape = (-1, 1, 1, 1)
    x = x + (u[:, 0] - 0.5).view(shape)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (u[:, 1] * 2).view(shape) + mean
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * (u[:, 2] + 0.5).view(shape) + mean


def cutout(x: torch.Tensor, u: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """A square of ratio x the image's side, centred anywhere in it (clipped at the edges), set to 0."""
    h, w = x.shape[2:]
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = (u[:, 0] * (h + 1 - ch % 2)).long()  # Zhao et al.: centres in 0..h - (1 - ch % 2)
    cx = (u[:, 1] * (w + 1 - cw % 2)).long()
    ys = torch.arange(h, device=x.device)[None, :] - cy[:, None] + ch // 2  # 0..ch-1 inside
    xs = torch.arange(w, device=x.device)[None, :] - cx[:, None] + cw // 2
    inside_y = (ys >= 0) & (ys < ch)
    inside_x = (xs >= 0) & (xs < cw)
    keep = ~(inside_y[:, :, None] & inside_x[:, None, :])  # (B, H, W)
    return x * keep[:, None].to(x.dtype)


# Each operation, and the uniform numbers it takes per image
OPERATIONS = {"symmetry": (symmetry, 1), "flip": (flip, 1), "translation": (translation, 2), "color": (color, 3),
              "cutout": (cutout, 2)}
ALL = ("symmetry", "translation", "color", "cutout")  # --augment all (flip is a part of symmetry)
