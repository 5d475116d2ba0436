"""The feature network: a classifier trained here on the same dataset and size (models/classifier.py)
instead of ImageNet's Inception network, in whose penultimate layer evaluate.py measures images.

    feature_network(...)   trained once per data file and recipe, then cached under outputs/features
    predict(...)           uint8 images -> features and logits
    train_classifier(...)  the recipe; the CAS and utility studies train more classifiers with it
    classification_scores  a classifier's accuracy, balanced accuracy, AUC and confusion on a split

Images enter as uint8 (N, C, S, S), exactly what a PNG or an exported npz would hold.
"""
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import Batches, Dataset, Split, as_tensor, load, locate, md5, to_float
from models.classifier import Classifier
from system import errors, files
from utils.augment import turn
from utils.log import Meter, format_stats
from utils.training import set_seed

VALUE_RANGE = (-1.0, 1.0)  # what the classifier reads
# How the feature network is trained. Part of the cache key: change it and the network retrains.
RECIPE = {"version": 1, "widths": [32, 64, 128, 256, 256], "epochs": 15, "batch_size": 128,
          "lr": 2e-3, "weight_decay": 5e-4, "seed": 0}


# The symmetry (utils/augment.py numbering) reached by flipping columns, flipping rows and
# transposing, each or not, for the coins (c0, c1, c2) as the number 4 c0 + 2 c1 + c2.
COIN_SYMMETRIES = torch.tensor([0, 7, 6, 3, 4, 1, 2, 5])


def random_symmetry(x: torch.Tensor, generator: torch.Generator, symmetries: str = "symmetry") -> torch.Tensor:
    """Each image under a random symmetry of the square that the dataset allows (data.SYMMETRIES:
    one of all 8 uniformly, a left-right mirror half the time, or none), from three coins per
    image drawn from `generator` (a classifier's own stream, apart from the run's). x: (B, C, H, W)
    with H == W."""
    if symmetries == "none":
        return x
    coins = (torch.rand(3, x.shape[0], generator=generator) < 0.5).long()
    k = COIN_SYMMETRIES[coins[0] * 4 + coins[1] * 2 + coins[2]] if symmetries == "symmetry" else 4 * coins[0]
    return turn(x, k.to(x.device))


def train_classifier(train: Split, device: torch.device, epochs: int, batch_size: int, lr: float,
                     weight_decay: float, seed: int, widths=RECIPE["widths"], val: Split | None = None,
                     desc: str = "classifier", steps: int | None = None, log_epochs: bool = True,
                     symmetries: str = "symmetry") -> Classifier:
    """Cross-entropy (per label for a multi-label set) with AdamW and a one-cycle schedule; each
    image under a random symmetry of the square that the dataset allows (`symmetries`, as
    data.SYMMETRIES names them) every time it is seen. `steps`, when given, replaces `epochs`: that many optimiser steps whatever the set's
    size (the utility study compares sets of different sizes at equal compute). One progress bar
    over all steps; with log_epochs, a line per epoch."""
    set_seed(seed)
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
        meter = Meter()
        for x, y in batches.epoch(epoch):
            logits = model(random_symmetry(x, flips, symmetries))
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
                bar.set_postfix(epoch=epoch + 1, **format_stats(meter.means()))
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
        # networks cached before the augmentation followed the dataset turned every image
        if saved.get("recipe") == recipe and saved.get("data_md5") == digest \
                and saved.get("symmetries", "symmetry") == data.symmetries:
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
        model = train_classifier(splits["train"], device, val=splits["val"], desc="feature network",
                                 symmetries=data.symmetries, **settings)
    info = {"file": str(file), "data_md5": digest, "recipe": recipe, "symmetries": data.symmetries,
            "val_accuracy": accuracy(model, splits["val"]) if len(splits["val"]) else None,
            "test_accuracy": accuracy(model, splits["test"]) if len(splits["test"]) else None}
    print(f"Feature network: test accuracy {percent(info['test_accuracy'])}, "
          f"val accuracy {percent(info['val_accuracy'])}")
    file.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_write(file) as tmp:
        torch.save({"model": model.state_dict(), "recipe": recipe, "symmetries": data.symmetries, "data_md5": digest,
                    "info": info}, tmp)
    files.atomic_write_text(file.with_suffix(".json"), json.dumps(info, indent=2) + "\n")
    return model.to(memory_format=torch.channels_last), info  # the faster layout for the feature pass
