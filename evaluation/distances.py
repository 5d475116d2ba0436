"""Distances between sets of images, pure functions of what they are given (no training):

    fid, kid               Frechet and kernel Inception distances (Heusel 2017, Binkowski 2018)
    precision_recall       k-NN manifold precision and recall (Kynkaanniemi et al. 2019)
    psnr, ssim             pixel measures of VAE reconstructions (Wang et al. 2004 for SSIM)
    class_shares           the class make-up of a set, to compare with the real split's

Features are (N, D) float64 (features.predict); images for psnr/ssim float in [0, 1], (B, C, H, W).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from data import as_tensor


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to a and b (Heusel et al., 2017):
    |mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)). The trace of the matrix square root is
    the sum of square roots of the eigenvalues of C_a^(1/2) C_b C_a^(1/2), which is symmetric, so
    no complex-valued sqrtm is needed."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(ca)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    m = root_a @ cb @ root_a
    tr_root = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + ca.trace() + cb.trace() - 2 * tr_root).item()


def kid(a: torch.Tensor, b: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception distance (Binkowski et al., 2018): the unbiased estimate of MMD^2 with the
    kernel k(x, y) = (x.y / D + 1)^3, averaged over random subsets; returns (mean, std over
    subsets). Unbiased: two draws of one distribution score about 0, sometimes below."""
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    g = torch.Generator().manual_seed(seed)
    d = a.shape[1]
    scores = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=g)[:m]]
        y = b[torch.randperm(len(b), generator=g)[:m]]
        kxx, kyy, kxy = [(p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y))]
        off = m * (m - 1)
        scores.append(((kxx.sum() - kxx.diagonal().sum()) / off + (kyy.sum() - kyy.diagonal().sum()) / off
                       - 2 * kxy.mean()).item())
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radii(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    return torch.cat([torch.cdist(x[i:i + chunk], x).kthvalue(k + 1, dim=1).values  # +1: itself at 0
                      for i in range(0, len(x), chunk)])


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """For each point: does it lie within radius of at least one centre?"""
    return torch.cat([(torch.cdist(points[i:i + chunk], centres) <= radii).any(1)
                      for i in range(0, len(points), chunk)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019). Each set's manifold is the union
    of balls around its points reaching their k-th nearest neighbour. Precision: the share of fake
    points inside the real manifold (are the samples realistic?); recall: the share of real
    points inside the fake manifold (is the data's variety covered?). Both sets should have the
    same size, since a denser set has smaller balls."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points in each set")
    precision = _inside(fake, real, _knn_radii(real, k)).double().mean().item()
    recall = _inside(real, fake, _knn_radii(fake, k)).double().mean().item()
    return precision, recall


def recall_misses(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """For each real point: how far it lies outside the fake manifold of precision_recall (its
    distance to a fake point less that point's k-NN radius, at the fake point where this is least;
    > 0: a miss of recall), and that fake point's index."""
    radii = _knn_radii(fake, k)
    margins, nearest = [], []
    for i in range(0, len(real), chunk):
        m = (torch.cdist(real[i:i + chunk], fake) - radii).min(1)
        margins.append(m.values)
        nearest.append(m.indices)
    return torch.cat(margins), torch.cat(nearest)


# ---------------------------------------------------------------------------------------------
# Pixel measures for reconstructions, images float in [0, 1], (B, C, H, W)


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error on images in [0, 1]."""
    return 10 * math.log10(1.0 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (Wang et al., 2004): local means, variances and covariance
    under an 11x11 Gaussian window (sigma 1.5), C1 = (0.01)^2, C2 = (0.03)^2, averaged over valid
    positions and channels. Returns (B,); 1 for identical images."""
    c = x.shape[1]
    t = torch.arange(window, dtype=x.dtype, device=x.device) - (window - 1) / 2
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window)
    blur = lambda img: F.conv2d(img, kernel, groups=c)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


# ---------------------------------------------------------------------------------------------
# Class make-up


def class_shares(labels: torch.Tensor | np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) class ids -> (C,) shares summing to 1; (N, L) 0/1 labels of a multi-label set ->
    (L,) the share of images that show each finding."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels.mean(0) if len(labels) else np.zeros(labels.shape[1])
    counts = np.bincount(labels, minlength=num_classes)
    return counts / max(1, counts.sum())


def proportional_labels(n: int, shares: np.ndarray, seed: int = 0) -> torch.Tensor:
    """n labels in the given class shares (largest remainders), in a seeded random order: what a
    conditional model is asked for so that its samples can be compared with the real split."""
    exact = np.asarray(shares) * n
    counts = np.floor(exact).astype(int)
    counts[np.argsort(counts - exact)[:n - counts.sum()]] += 1
    labels = torch.from_numpy(np.repeat(np.arange(len(shares)), counts))
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def pixel_noise(images: np.ndarray, n: int, generator: torch.Generator) -> torch.Tensor:
    """n images of independent per-pixel Gaussian noise with the mean and std of `images`
    (uint8, as in the npz): a generator that learned only the palette. Returns uint8 (n, C, S, S)."""
    pixels = as_tensor(images).float()
    mean, std = pixels.mean(0), pixels.std(0)
    return torch.stack([(mean + std * torch.randn(mean.shape, generator=generator)).round().clamp(0, 255)
                        for _ in range(n)]).to(torch.uint8)
