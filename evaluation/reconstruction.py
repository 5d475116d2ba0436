"""The VAE's reconstructions over a split: negative ELBO and its parts, MSE, PSNR and SSIM, which
train_vae.py logs for validation and evaluate.py for the test split."""
import torch
import torch.nn.functional as F

from data import Batches, to_uint8
from evaluation.distances import psnr, ssim
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
            sums["val_ssim"] += ssim(recon, x).sum().item()
            n += b
    model.train()
    means = {k: v / n for k, v in sums.items()}
    means["val_psnr"] = psnr(means["val_mse"])
    return means

