"""Numbers for generated images, taken in the feature space of a classifier trained here on the
same dataset and size (models/classifier.py) instead of ImageNet's Inception network.

    feature_network(...)   the classifier, trained once per data file and cached under outputs/
    fid, kid               Frechet and kernel Inception distances (Heusel 2017, Binkowski 2018)
    precision_recall       k-NN manifold precision and recall (Kynkaanniemi et al. 2019)
    ssim                   structural similarity (Wang et al. 2004) for VAE reconstructions
    KIDProbe               the cheap KID that --eval-every logs during training

Images enter as uint8 (N, C, S, S), exactly what a PNG or an exported npz would hold.
"""
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils import errors, files, loop
from data import Batches, Dataset, Split, as_tensor, load, locate, md5, to_float
from models.classifier import Classifier, random_symmetry

VALUE_RANGE = (-1.0, 1.0)  # what the classifier reads
KID_PANEL = ("KID against the test split", ["kid"], 0.0)  # for pictures.plot_curves
# How the feature network is trained. Part of the cache key: change it and the network retrains.
RECIPE = {"version": 1, "widths": [32, 64, 128, 256, 256], "epochs": 15, "batch_size": 128,
          "lr": 2e-3, "weight_decay": 5e-4, "seed": 0}


# ---------------------------------------------------------------------------------------------
# The classifier: training, prediction, the cached feature network


def train_classifier(train: Split, device: torch.device, epochs: int, batch_size: int, lr: float,
                     weight_decay: float, seed: int, widths=RECIPE["widths"], val: Split | None = None,
                     desc: str = "classifier", steps: int | None = None, log_epochs: bool = True) -> Classifier:
    """Cross-entropy (per label for a multi-label set) with AdamW and a one-cycle schedule; each
    image under a random symmetry of the square (flips, 90 degree rotations) every time it is
    seen. `steps`, when given, replaces `epochs`: that many optimiser steps whatever the set's
    size (the utility study compares sets of different sizes at equal compute). One progress bar
    over all steps; with log_epochs, a line per epoch."""
    loop.set_seed(seed)
    model = Classifier(train.num_classes, train.channels, tuple(widths)).to(device)
    batches = Batches(train, batch_size, device, VALUE_RANGE, seed=seed)
    total = steps or epochs * len(batches)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.2)
    flips = torch.Generator().manual_seed(seed)
    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
    step, epoch = 0, 0
    model.train()
    while step < total:
        meter = loop.Meter()
        for x, y in batches.epoch(epoch):
            logits = model(random_symmetry(x, flips))
            if train.multi_label:
                loss, hit = F.binary_cross_entropy_with_logits(logits, y.float()), (logits > 0) == y.bool()
            else:
                loss, hit = F.cross_entropy(logits, y), logits.argmax(1) == y
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            meter.update(loss=loss.detach(), acc=hit.float().mean())
            step += 1
            bar.update()
            if step % 10 == 0 or step == total:
                bar.set_postfix(epoch=epoch + 1, **loop.format_stats(meter.means()))
            if step == total:
                break
        epoch += 1
        if log_epochs:
            val_acc = accuracy(model, val) if val is not None and len(val) else float("nan")
            tqdm.write(f"{desc} epoch {epoch}/{-(-total // len(batches))}  " + "  ".join(
                f"{k} {v:.4f}" for k, v in {**meter.means(), "val_acc": val_acc}.items()))
    bar.close()
    return model.eval()


@torch.no_grad()
def predict(model: Classifier, images: torch.Tensor | np.ndarray, batch_size: int = 500,
            desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, C, S, S) (or an array as in the npz) -> features (N, D) float64 and
    logits (N, classes), on the CPU. `desc` shows a progress bar."""
    if isinstance(images, np.ndarray):
        images = as_tensor(images)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats, logits = [], []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=desc is None, leave=False, dynamic_ncols=True):
        f = model.features(to_float(images[i:i + batch_size].to(device), VALUE_RANGE))
        feats.append(f.double().cpu())
        logits.append(model.head(f).cpu())
    model.train(was_training)
    return torch.cat(feats), torch.cat(logits)


def percent(accuracy: float | None) -> str:
    """An accuracy for people; None where the split was empty (e.g. an exported synthetic npz)."""
    return "n/a (empty split)" if accuracy is None else f"{100 * accuracy:.2f} %"


def accuracy(model: Classifier, split: Split) -> float:
    """The share of right classes; of right labels (each finding present or not) for a multi-label set."""
    logits = predict(model, split.images)[1]
    predicted = (logits > 0).long() if split.multi_label else logits.argmax(1)
    return (predicted.numpy() == split.labels).mean().item()


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random
    negative, ties counting half (the Mann-Whitney U statistic over average ranks)."""
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = (ends - (counts - 1) / 2)[inverse]  # 1-based, ties share their mean rank
    n_pos = int(positive.sum())
    n_neg = len(scores) - n_pos
    return ((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def per_class_rate(hit: torch.Tensor, labels: torch.Tensor, classes: int) -> list[float | None]:
    """The mean of `hit` (N,) over the items of each class in `labels` (N,): a recall, or a class
    accuracy; None for a class with no items."""
    hit = hit.double()
    return [hit[labels == c].mean().item() if (labels == c).any() else None for c in range(classes)]


def classification_scores(logits: torch.Tensor, labels: torch.Tensor | np.ndarray) -> dict:
    """A classifier's test scores: accuracy, balanced accuracy (the mean of the per-class
    recalls), macro one-vs-rest ROC AUC of the softmax probabilities, each class's recall, and
    the confusion counts (confusion[true][predicted]: where each class's misses went). Classes
    missing from `labels` get no recall (None) and are left out of the means."""
    labels = torch.as_tensor(np.asarray(labels)).reshape(-1)
    probs = logits.double().softmax(1)
    predicted = probs.argmax(1)
    classes = logits.shape[1]
    recall = per_class_rate(predicted == labels, labels, classes)
    present = [c for c, r in enumerate(recall) if r is not None]
    aucs = [roc_auc(probs[:, c], labels == c) for c in present if (labels != c).any()]
    return {"accuracy": (predicted == labels).double().mean().item(),
            "balanced_accuracy": float(np.mean([recall[c] for c in present])),
            "auc": float(np.mean(aucs)) if aucs else float("nan"),
            "recall": recall,
            "confusion": torch.bincount(labels * classes + predicted, minlength=classes * classes
                                        ).view(classes, classes).tolist()}


def pixel_noise(images: np.ndarray, n: int, generator: torch.Generator) -> torch.Tensor:
    """n images of independent per-pixel Gaussian noise with the mean and std of `images`
    (uint8, as in the npz): a generator that learned only the palette. Returns uint8 (n, C, S, S)."""
    pixels = as_tensor(images).float()
    mean, std = pixels.mean(0), pixels.std(0)
    return torch.stack([(mean + std * torch.randn(mean.shape, generator=generator)).round().clamp(0, 255)
                        for _ in range(n)]).to(torch.uint8)


def feature_network(data: Dataset, data_root: str, device: torch.device, cache: str = "outputs/features",
                    recipe: dict | None = None) -> tuple[Classifier, dict]:
    """The classifier for this dataset's file: loaded from `cache` when one was trained for the
    same file (by MD5) and recipe, else trained now (minutes on a CPU) and saved there. Its
    input channels and classes are the dataset's.
    Returns (model in eval mode on `device`, info with its accuracies and cache path)."""
    recipe = recipe or RECIPE
    files.check_folder(Path(cache), "--feature-cache")  # before minutes of training, not after
    path = locate(data, data_root)
    digest = md5(path)
    file = Path(cache) / f"classifier_{path.stem}_{digest[:12]}.pt"
    if file.is_file():
        try:
            saved = torch.load(file, map_location=device, weights_only=True)
        except Exception as e:
            raise errors.UserError(f"{file} is not readable ({type(e).__name__}); delete it to retrain") from None
        if not isinstance(saved, dict) or not {"model", "info"} <= saved.keys():
            raise errors.UserError(f"{file} is not a feature network of this repo; delete it to retrain")
        if saved.get("recipe") == recipe and saved.get("data_md5") == digest:
            model = Classifier(data.num_classes, data.channels, tuple(recipe["widths"]))
            try:
                model.load_state_dict(saved["model"])
            except (RuntimeError, TypeError, AttributeError) as e:
                raise errors.UserError(f"{file} does not match the feature network ({type(e).__name__}); "
                                       "delete it to retrain") from None
            return model.to(device, memory_format=torch.channels_last).eval(), saved["info"]
    print(f"Training the feature network on {path.name} ({recipe['epochs']} epochs; once, then "
          f"cached in {file})")
    splits = load(data, data_root)
    settings = {k: v for k, v in recipe.items() if k != "version"}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # a training run's RNG stays as it was
        model = train_classifier(splits["train"], device, val=splits["val"], desc="feature network", **settings)
    info = {"file": str(file), "data_md5": digest, "recipe": recipe,
            "val_accuracy": accuracy(model, splits["val"]) if len(splits["val"]) else None,
            "test_accuracy": accuracy(model, splits["test"]) if len(splits["test"]) else None}
    print(f"Feature network: test accuracy {percent(info['test_accuracy'])}, "
          f"val accuracy {percent(info['val_accuracy'])}")
    file.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_write(file) as tmp:
        torch.save({"model": model.state_dict(), "recipe": recipe, "data_md5": digest, "info": info}, tmp)
    files.atomic_write_text(file.with_suffix(".json"), json.dumps(info, indent=2) + "\n")
    return model.to(memory_format=torch.channels_last), info  # the faster layout for the feature pass


# ---------------------------------------------------------------------------------------------
# Distances between sets of features (N, D), float64


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


# ---------------------------------------------------------------------------------------------
# KID during training (--eval-every)


class KIDProbe:
    """KID of a generator's samples against the test split, for --eval-every in the training
    scripts. The feature network and the test features are computed once; each call draws
    --eval-n images from fixed latents (the same every time, without touching the run's RNG)."""

    def __init__(self, args, data: Dataset, latent_dim: int, device: torch.device):
        self.every, self.epochs = args.eval_every, args.epochs
        splits = load(data, args.data_root, splits=("train", "test"))
        if len(splits["test"]) < 2:
            raise errors.UserError(f"--eval-every needs at least 2 test images; the data file's test split "
                                   f"has {len(splits['test'])}")
        self.model, _ = feature_network(data, args.data_root, device, args.feature_cache)
        self.real = predict(self.model, splits["test"].images)[0]
        self.z = loop.fixed_noise(args.eval_n, latent_dim, args.seed + 1, device)
        # labels in the training shares: what conditional models and the VAE's class mixture draw
        # (a multi-label set has neither)
        self.y = None if data.multi_label else proportional_labels(
            args.eval_n, class_shares(splits["train"].labels, data.num_classes), args.seed).to(device)

    def due(self, epoch: int) -> bool:
        """After `epoch` (counted from 1) epochs?"""
        return epoch % self.every == 0 or epoch == self.epochs

    @torch.no_grad()
    def __call__(self, generate, batch_size: int = 250) -> dict[str, float]:
        """generate(z, y) -> uint8 images; returns {"kid": mean, "kid_std": std over subsets}."""
        images = torch.cat([generate(self.z[i:i + batch_size], None if self.y is None else self.y[i:i + batch_size])
                            for i in range(0, len(self.z), batch_size)])
        mean, std = kid(predict(self.model, images)[0], self.real, subsets=50)
        return {"kid": mean, "kid_std": std}
