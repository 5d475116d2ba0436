"""Is the synthetic data useful? Is it private? The studies behind evaluate.py's --utility and
--memorization flags.

    cas(...)           train on synthetic images, test on real ones: the Classification Accuracy
                       Score (Ravuri & Vinyals, 2019), beside the same classifier trained on the
                       real train split (the ceiling) and on noise with real labels (the floor)
    augmentation(...)  stratified real subsets (1 %, 10 %, 100 %) alone and with synthetic
                       images added, over several seeds
    memorization(...)  how close generated images come to the generator's training images,
                       against how close held-out real images come to them

A generator here is any function `generate(labels (N,), seed) -> uint8 images (N, C, S, S)`:
evaluate.py passes a checkpoint's drawing network, the tests pass real images and noise. Every classifier
is features.train_classifier with the feature network's recipe and takes the recipe's number of
steps on the full train split, whatever its own set's size, so that rows differ in data alone.
"""
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from data import Split, as_array, as_tensor, to_float
from evaluation import features, report
from utils import pictures
from evaluation.distances import pixel_noise

Generate = Callable[[torch.Tensor, int], torch.Tensor]


def recipe_steps(n_train: int) -> int:
    """The optimiser steps of the recipe on a train split of n_train images."""
    return features.RECIPE["epochs"] * max(1, n_train // features.RECIPE["batch_size"])


def fit(train: Split, test: Split, device: torch.device, seed: int, steps: int, desc: str,
        bar: tqdm | None = None, symmetries: str = "symmetry") -> dict:
    """Train the recipe's classifier on `train` for `steps` steps, each image turned as the
    dataset allows (`symmetries`, data.SYMMETRIES); its scores on `test`."""
    settings = {k: v for k, v in features.RECIPE.items() if k not in ("version", "seed")}
    model = features.train_classifier(train, device, seed=seed, steps=steps, desc=desc, log_epochs=False,
                                      symmetries=symmetries, **settings)
    scores = features.classification_scores(features.predict(model, test.images)[1], test.labels)
    if bar is not None:
        bar.update()
    return scores


def balanced_counts(n: int, num_classes: int) -> np.ndarray:
    """n images over the classes, n // C or n // C + 1 each."""
    return np.array([n // num_classes + (c < n % num_classes) for c in range(num_classes)])


def draw(generate: Generate, counts: np.ndarray, seed: int, device: torch.device) -> Split:
    """counts[c] generated images of each class c, as a Split (NHWC uint8, like the npz)."""
    labels = torch.from_numpy(np.repeat(np.arange(len(counts)), counts))
    images = generate(labels.to(device), seed)
    return Split(as_array(images), labels.numpy(), len(counts))


def stratified_subset(split: Split, fraction: float, seed: int) -> Split:
    """round(fraction * n_c) images of each class c (at least one), drawn by `seed`."""
    rng = np.random.default_rng(seed)
    keep = [rng.choice(idx, max(1, round(fraction * len(idx))), replace=False)
            for c in range(split.num_classes) if len(idx := np.flatnonzero(split.labels == c))]
    keep = np.sort(np.concatenate(keep))
    return Split(split.images[keep], split.labels[keep], split.num_classes)


def join(a: Split, b: Split) -> Split:
    return Split(np.concatenate([a.images, b.images]), np.concatenate([a.labels, b.labels]), a.num_classes)


# ---------------------------------------------------------------------------------------------
# Train on synthetic, test on real


def cas(generators: dict[str, Generate], train: Split, test: Split, device: torch.device, seed: int = 0,
        ceiling: torch.nn.Module | None = None, bar: tqdm | None = None, sizes=(1.0,),
        floor: bool = True, symmetries: str = "symmetry") -> list[dict]:
    """Rows of test scores for classifiers trained on: the real train split (the ceiling; pass
    `ceiling` when that classifier exists already, as the feature network does), noise images
    with the real labels (the floor, unless floor is False), and, per generator and size, a
    class-balanced synthetic set of size x the real train split's images (synthetic images are
    free: a larger set shows the classifier more of what the generator knows, in the same
    number of steps). A row's "generator" names its generator, "size" its multiple."""
    steps = recipe_steps(len(train))
    if ceiling is None:
        real = fit(train, test, device, seed, steps, "CAS: real train split", bar, symmetries)
    else:
        real = features.classification_scores(features.predict(ceiling, test.images)[1], test.labels)
    rows = [{"name": "real train split (ceiling)", "images": len(train), **real}]
    if floor:
        noise = Split(as_array(pixel_noise(train.images, len(train), torch.Generator().manual_seed(seed))),
                      train.labels, train.num_classes)
        rows.append({"name": "pixel noise, real labels (floor)", "images": len(train),
                     **fit(noise, test, device, seed, steps, "CAS: noise", bar, symmetries)})
    for name, generate in generators.items():
        for size in sizes:
            row_name = name if size == 1 else f"{name}, {size:g}x real"
            synthetic = draw(generate, balanced_counts(round(size * len(train)), train.num_classes), seed, device)
            rows.append({"name": row_name, "generator": name, "size": size, "images": len(synthetic),
                         **fit(synthetic, test, device, seed, steps, f"CAS: {row_name}", bar, symmetries)})
    return rows


# ---------------------------------------------------------------------------------------------
# Augmentation


def augmentation(generators: dict[str, Generate], train: Split, test: Split, device: torch.device,
                 fractions=(0.01, 0.1, 1.0), seeds=(0, 1, 2), ratio: float = 1.0,
                 bar: tqdm | None = None, symmetries: str = "symmetry") -> list[dict]:
    """For each fraction and seed: a stratified real subset alone, and with round(ratio * n_c)
    synthetic images of each class c added per generator. One row per (fraction, training set)
    with the per-seed test scores, their mean and std (over seeds, n - 1), and for the
    augmented rows the gain in accuracy over the real subset alone, seed by seed."""
    steps = recipe_steps(len(train))
    rows = []
    for fraction in fractions:
        alone = None
        for name, generate in [("real only", None), *generators.items()]:
            runs, n_real, n_synthetic = [], 0, 0
            for seed in seeds:
                real = stratified_subset(train, fraction, seed)
                counts = np.round(ratio * np.bincount(real.labels, minlength=real.num_classes)).astype(int)
                data = real if generate is None else join(real, draw(generate, counts, seed, device))
                n_real, n_synthetic = len(real), len(data) - len(real)
                runs.append(fit(data, test, device, seed, steps, f"{fraction:.0%} {name}, seed {seed}", bar, symmetries))
            row = {"fraction": fraction, "training_set": name, "real_images": n_real,
                   "synthetic_images": n_synthetic, "seeds": list(seeds)}
            for key in ("accuracy", "balanced_accuracy", "auc"):
                values = np.array([r[key] for r in runs])
                row.update({key: values.tolist(), f"{key}_mean": values.mean(), f"{key}_std": _std(values)})
            if generate is None:
                alone = np.array(row["accuracy"])
            else:
                gain = np.array(row["accuracy"]) - alone
                row.update(gain=gain.tolist(), gain_mean=gain.mean(), gain_std=_std(gain))
            rows.append(row)
    return rows


def _std(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# Memorisation


def nearest(queries: torch.Tensor, refs: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of queries (N, D), the Euclidean distance to its nearest row of refs (M, D)
    and that row's index. The search runs in the refs' dtype and device (cdist's fast matrix
    form); the winning distance is then recomputed exactly in float64, so a copy scores 0."""
    dist, index = [], []
    for i in range(0, len(queries), chunk):
        q = queries[i:i + chunk].to(refs.device, refs.dtype)
        j = torch.cdist(q, refs).argmin(1)
        dist.append((q.double() - refs[j].double()).norm(dim=1).cpu())
        index.append(j.cpu())
    return torch.cat(dist), torch.cat(index)


def pixels(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, 3, 64, 64) -> float32 (N, 12288) in [0, 1] on `device`."""
    return to_float(images.to(device), (0.0, 1.0)).flatten(1)


def distance_summary(generated: torch.Tensor, heldout: torch.Tensor) -> dict:
    """Nearest-training-image distances of generated and held-out images -> the medians, their
    ratio (about 1 or above: no sign of copying; near 0: copies) and the share of generated
    images closer than the 5th percentile of the held-out distances (about 0.05 by chance)."""
    p5 = torch.quantile(heldout, 0.05).item()
    med_g, med_h = generated.median().item(), heldout.median().item()
    return {"median_generated": med_g, "median_heldout": med_h,
            "median_ratio": med_g / med_h if med_h > 0 else float("nan"),
            "heldout_p5": p5, "share_below_heldout_p5": (generated < p5).double().mean().item()}


def memorization(images: dict[str, torch.Tensor], features: dict[str, torch.Tensor],
                 device: torch.device) -> tuple[dict, dict]:
    """images and their classifier features, each a dict with "generated", "train" (the
    generator's own training images) and "heldout" (real images it never saw); images uint8
    (N, 3, 64, 64), features (N, D). Returns (summary in the feature space and in pixel space,
    the nearest pairs for pictures: {"generated" / "heldout": (distances, train indices)} in
    pixel space). The searches run on `device`."""
    train_features, train_pixels = features["train"].to(device), pixels(images["train"], device)
    space, pairs = {}, {}
    for who in ("generated", "heldout"):
        space[who] = nearest(features[who], train_features)[0]
        pairs[who] = nearest(pixels(images[who], device), train_pixels)
    summary = {"feature": distance_summary(space["generated"], space["heldout"]),
               "pixel": distance_summary(pairs["generated"][0], pairs["heldout"][0])}
    return summary, pairs


def pairs_picture(generated: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor, pairs: dict,
                  k: int = 8) -> tuple[torch.Tensor, list[str]]:
    """The 2k generated images closest to a training image (pixel space), each above its
    nearest training image, then the k closest held-out images above theirs, for contrast:
    images (6k, 3, 64, 64) in [0, 1] for a grid of k columns, and its row labels."""
    k = max(1, min(k, len(generated) // 2, len(heldout)))
    rows, labels = [], []
    for images, who, label, blocks in ((generated, "generated", "generated", 2), (heldout, "heldout", "held-out", 1)):
        dist, index = pairs[who]
        order = dist.argsort()[:blocks * k]
        for b in range(blocks):
            chosen = order[b * k:(b + 1) * k]
            rows += [images[chosen].cpu(), train[index[chosen]].cpu()]
            labels += [label, "nearest train"]
    return torch.cat(rows).float() / 255, labels


def misses_picture(real: torch.Tensor, samples: torch.Tensor, margins: torch.Tensor, nearest: torch.Tensor,
                   k: int = 8, blocks: int = 3) -> tuple[torch.Tensor, list[str]]:
    """The real images furthest outside the samples' manifold (recall's misses), k a row, each
    above the sample nearest to it in features: images in [0, 1] for a grid of k columns, and
    its row labels."""
    order = margins.argsort(descending=True)[:blocks * k]
    rows, labels = [], []
    for b in range(len(order) // k):
        chosen = order[b * k:(b + 1) * k].cpu()
        rows += [real[chosen].cpu(), samples[nearest[chosen].cpu()].cpu()]
        labels += ["real, missed", "nearest sample"]
    return torch.cat(rows).float() / 255, labels


def memorization_row(name: str, trained, images: torch.Tensor, feats: torch.Tensor,
                     splits: dict, real: dict, fnet, args, train_features: dict) -> dict:
    """evaluate.py --memorization for one checkpoint (utils.checkpoint.Trained): memorization()
    against the images it was trained on (the first --subset of the train split, if it was
    trained on a subset; their features are computed once per subset), and the pairs picture.
    The scored split (--split) is the held-out set."""
    subset = trained.settings["subset"]
    train, heldout = as_tensor(splits["train"].images[:subset]), as_tensor(splits[args.split].images)
    if subset not in train_features:
        train_features[subset] = features.predict(fnet, train, args.batch_size, desc="features: training images")[0]
    summary, pairs = memorization(
        {"generated": images, "train": train, "heldout": heldout},
        {"generated": feats, "train": train_features[subset], "heldout": real["features"]}, images.device)
    picture, labels = pairs_picture(images, train, heldout, pairs)
    out = report.beside(trained.path, "memorization_pairs.png" if args.split == "test" else f"memorization_pairs_{args.split}.png")
    pictures.save_grid(picture, out, nrow=len(picture) // len(labels), row_labels=labels)
    return {"name": name, "checkpoint": str(trained.path), "n_generated": len(images), "n_heldout": len(heldout),
            "train_images": len(train), **summary, "pairs_png": str(out)}
