"""The VAE beyond its training loss: the numbers of its reconstructions over a split (negative
ELBO and its parts, MSE, PSNR, SSIM), which train_vae.py logs for validation and evaluate.py for
the test split, and the sampling densities fitted to its training codes after each epoch."""
import torch
import torch.nn.functional as F

from evaluation import metrics
from data import Batches, to_float, to_uint8
from models.vae import VALUE_RANGE, VAE


@torch.no_grad()
def evaluate(model: VAE, batches: Batches, seed: int, keep: list | None = None) -> dict[str, float]:
    """Negative ELBO (beta = 1), its parts, and the MSE, PSNR and SSIM of mean reconstructions,
    per image. `keep`, when given, receives each batch's mean reconstructions (uint8, on the CPU)
    and labels, for measures of the reconstructions themselves.

    The posterior samples come from a fixed seed in a forked RNG, so the numbers compare across
    epochs and evaluating does not disturb the training run's random stream.
    """
    model.eval()
    sums = {"val_nelbo": 0.0, "val_recon": 0.0, "val_kl": 0.0, "val_mse": 0.0, "val_ssim": 0.0}
    n = 0
    devices = [batches.device] if batches.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for x, labels in batches.epoch(0):
            y = labels if model.num_classes else None
            logits, mu, logvar = model(x, y)
            parts = model.loss(x, logits, mu, logvar, y, beta=1.0)
            b = x.shape[0]
            sums["val_nelbo"] += parts["loss"].item() * b
            sums["val_recon"] += parts["recon"].item() * b
            sums["val_kl"] += parts["kl"].item() * b
            recon = model.decode(mu, y)
            if keep is not None:
                keep.append((to_uint8(recon, VALUE_RANGE).cpu(), labels.cpu()))
            sums["val_mse"] += F.mse_loss(recon, x, reduction="sum").item() / x[0].numel()
            sums["val_ssim"] += metrics.ssim(recon, x).sum().item()
            n += b
    model.train()
    means = {k: v / n for k, v in sums.items()}
    means["val_psnr"] = metrics.psnr(means["val_mse"])
    return means


@torch.no_grad()
def fit_prior(model: VAE, batches: Batches, chunk: int = 500) -> None:
    """Fit the VAE's sampling densities to the encoder means and labels of the training split
    (read in order from the batches' own copy of it)."""
    model.eval()
    mu = []
    for i in range(0, len(batches.labels), chunk):
        x, y = to_float(batches.images[i:i + chunk], VALUE_RANGE), batches.labels[i:i + chunk]
        mu.append(model.encode(x, y if model.num_classes else None)[0])
    model.fit_prior(torch.cat(mu), batches.labels)
