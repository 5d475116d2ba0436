"""A second measure that needs no training: the sliced Wasserstein distance (SWD) between the
local patches of two image sets, per scale of a Laplacian pyramid (Karras et al. 2018, "Progressive
growing of GANs", appendix D). The feature network sees what tells classes apart; this sees what
any pixel neighbourhood holds, class or not: fine texture at the finest scale, the layout and
colour of the whole image at the coarsest.

Per scale: every image's pyramid level, 7x7 patches on a fixed 8x8 grid of positions (so a set's
descriptors do not depend on the order of its images), each patch a vector of 7*7*C values,
normalised per channel by the reference set's mean and deviation (ProGAN normalises each set by
its own; with one normalisation a shift of colour between the sets counts). Then the mean, over
random unit directions, of the 1-D Wasserstein distance between the two sets' projections, read
at QUANTILES quantiles, x1000 as ProGAN reports it. 0 for identical sets; it grows as the sets'
patches differ."""
import torch
import torch.nn.functional as F

PATCH = 7  # ProGAN's neighbourhood
GRID = 8  # patch positions per side, per image and scale
DIRECTIONS = 512  # ProGAN: 4 repeats of 128
QUANTILES = 4096  # where each direction's distribution is read: 1-D W1 to a 1/4096 step of probability
SMALLEST = 14  # the pyramid halves while the image is at least twice this: 64 -> 64, 32, 16


def _binomial(channels: int, device) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=device)
    k = (k[:, None] * k[None, :]) / 256
    return k.expand(channels, 1, 5, 5)


def _blur(x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), _binomial(x.shape[1], x.device), groups=x.shape[1])


def sizes(size: int) -> list[int]:
    """The side of each pyramid level, finest first: [64, 32, 16] for 64 pixels, [28, 14] for 28."""
    out = [size]
    while out[-1] >= 2 * SMALLEST:
        out.append(out[-1] // 2)
    return out


def laplacian_pyramid(x: torch.Tensor) -> list[torch.Tensor]:
    """Images (N, C, S, S) float -> levels, finest first: each the image at its scale minus the
    next coarser one brought back up (the detail that scale adds), the last the coarsest image."""
    levels, current = [], x
    for _ in sizes(x.shape[-1])[1:]:
        down = _blur(current)[..., ::2, ::2]
        up = F.interpolate(down, size=current.shape[-2:], mode="bilinear", align_corners=False)
        levels.append(current - up)
        current = down
    return levels + [current]


def descriptors(images: torch.Tensor, batch_size: int = 500) -> list[torch.Tensor]:
    """uint8 images (N, C, S, S) -> per scale, patches (N * GRID**2, PATCH * PATCH * C) float32."""
    out = None
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float() / 127.5 - 1
        for s, level in enumerate(laplacian_pyramid(x)):
            side = level.shape[-1]
            pos = torch.linspace(0, side - PATCH, GRID).round().long()
            idx = (pos[:, None] + torch.arange(PATCH)).flatten()  # GRID*PATCH rows (and columns) to keep
            p = level[:, :, idx][:, :, :, idx]  # (B, C, GRID*PATCH, GRID*PATCH)
            b, c = p.shape[:2]
            p = p.reshape(b, c, GRID, PATCH, GRID, PATCH).permute(0, 2, 4, 3, 5, 1).reshape(-1, PATCH * PATCH * c)
            out = out or [[] for _ in range(len(sizes(images.shape[-1])))]
            out[s].append(p)
    return [torch.cat(parts) for parts in out]


def quantiles(projections: torch.Tensor, points: int) -> torch.Tensor:
    """(N, K) values -> (points, K): each column's sorted values at the quantiles (i + 0.5) / points."""
    at = ((torch.arange(points, dtype=torch.float64) + 0.5) / points * len(projections)).long()
    return projections.t().contiguous().sort(1).values[:, at].t()  # rows sort about twice as fast


def directions(dim: int, count: int, seed: int) -> torch.Tensor:
    """(dim, count) random unit vectors, the same for the same seed."""
    d = torch.randn(dim, count, generator=torch.Generator().manual_seed(seed))
    return d / d.norm(dim=0, keepdim=True)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, count: int = DIRECTIONS, seed: int = 0,
                       points: int | None = None) -> float:
    """Mean over `count` random unit directions of the 1-D Wasserstein-1 distance between the
    projections of the rows of a (Na, D) and b (Nb, D), both read at the same quantiles (min(Na,
    Nb) of them unless `points` says; exact for Na == Nb)."""
    points = points or min(len(a), len(b))
    total = 0.0
    for d in directions(a.shape[1], count, seed).to(a.dtype).split(64, dim=1):
        total += (quantiles(a @ d, points) - quantiles(b @ d, points)).abs().sum().item()
    return total / (points * count)


class Reference:
    """The real images' patches, once: normalised, projected on each scale's directions and kept as
    QUANTILES quantiles per direction; swd(images) compares a set with them."""

    def __init__(self, images: torch.Tensor, seed: int = 0):
        self.channels = images.shape[1]
        self.stats, self.directions, self.quantiles = [], [], []
        for s, d in enumerate(descriptors(images)):
            per_channel = d.reshape(-1, self.channels)  # the last axis of a descriptor is the channel
            self.stats.append((per_channel.mean(0).repeat(PATCH * PATCH),
                               per_channel.std(0).clamp_min(1e-8).repeat(PATCH * PATCH)))
            self.directions.append(directions(d.shape[1], DIRECTIONS, seed + s))
            self.quantiles.append(self._quantiles(d, s))

    def _quantiles(self, d: torch.Tensor, scale: int) -> torch.Tensor:
        mean, std = self.stats[scale]
        d = (d - mean) / std
        return torch.cat([quantiles(d @ dirs, QUANTILES) for dirs in self.directions[scale].split(64, dim=1)], 1)

    def scores(self, images: torch.Tensor) -> dict:
        """{"swd": SWD x1000 per scale, finest first, "swd_mean": their mean}, rounded for a log."""
        swd = [round(v, 3) for v in self.swd(images)]
        return {"swd": swd, "swd_mean": round(sum(swd) / len(swd), 3)}

    def swd(self, images: torch.Tensor) -> list[float]:
        """SWD x1000 per scale, finest first, of uint8 images (N, C, S, S) against the reference."""
        return [1000 * (self._quantiles(d, s) - self.quantiles[s]).abs().mean().item()
                for s, d in enumerate(descriptors(images))]
