"""MedMNIST 2D datasets at any of their sizes: the one loader both training scripts use.

A MedMNIST file (`bloodmnist_64.npz`; `pathmnist.npz` at 28 pixels) holds `{train,val,test}_images`
uint8, (N, S, S, 3) for colour sets and (N, S, S) for grayscale ones, and `{train,val,test}_labels`
(N, 1) class ids, or (N, L) 0/1 columns for the multi-label chestmnist. It is read once into
memory and checked against its Dataset (name and size, with channels, class names and task from
`medmnist.INFO`); batches are then cut from one uint8 tensor held on the training device, so there
is no per-image PIL work at all.

    from data import Dataset, load, Batches
    dataset = Dataset("bloodmnist", 64)
    splits = load(dataset, "data")                   # downloads through medmnist's URL if missing
    batches = Batches(splits["train"], 128, device, value_range=(-1, 1), seed=0)
    for x, y in batches.epoch(0): ...                # x (128, 3, 64, 64) float, y (128,) int64
"""
import functools
import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from system.errors import UserError, warn
from system.files import atomic_write
from system.hardware import memory_format

# MedMNIST v3's 2D datasets and their sizes (medmnist.INFO also lists 3D volumes, not for here)
DATASETS = ("bloodmnist", "breastmnist", "chestmnist", "dermamnist", "octmnist", "organamnist",
            "organcmnist", "organsmnist", "pathmnist", "pneumoniamnist", "retinamnist", "tissuemnist")
SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
# Which turns of the square leave an image of each dataset a possible image of it, as the
# augmentation that shows every training image turned (utils/augment.py) names them: all 8
# ("symmetry") where nothing in the image has an up or a side, left-right mirrors alone ("flip")
# where it has an up but either side could be either, none where both matter. Reasons per
# dataset: docs/datasets.md, "Which images have an up".
SYMMETRIES = {"bloodmnist": "symmetry", "pathmnist": "symmetry", "tissuemnist": "symmetry", "dermamnist": "symmetry",
              "breastmnist": "flip", "octmnist": "flip", "retinamnist": "flip",
              "chestmnist": "none", "pneumoniamnist": "none",
              "organamnist": "none", "organcmnist": "none", "organsmnist": "none"}


@functools.cache
def _info(name: str) -> dict:
    from medmnist.info import INFO  # imported here: it pulls in medmnist's whole package
    return INFO[name]


@dataclass(frozen=True)
class Dataset:
    """One MedMNIST dataset at one size: what the models, grids and checks need to know of it."""
    name: str = "bloodmnist"
    size: int = 64

    def __post_init__(self):
        if self.name not in DATASETS:
            raise UserError(f"unknown dataset {self.name!r}; choose one of {', '.join(DATASETS)}")
        if self.size not in SIZES:
            raise UserError(f"MedMNIST has no {self.size}-pixel files; --size takes one of {', '.join(map(str, SIZES))}")

    @property
    def info(self) -> dict:
        """MedMNIST's record: URLs, MD5s, label names, task, channels, split sizes."""
        return _info(self.name)

    @property
    def filename(self) -> str:
        return f"{self.name}.npz" if self.size == 28 else f"{self.name}_{self.size}.npz"

    @property
    def url(self) -> str:
        return self.info["url" if self.size == 28 else f"url_{self.size}"]

    @property
    def md5(self) -> str:
        return self.info["MD5" if self.size == 28 else f"MD5_{self.size}"]

    @property
    def channels(self) -> int:
        return self.info["n_channels"]

    @property
    def num_classes(self) -> int:
        """Classes of a single-label set; labels (columns) of the multi-label chestmnist."""
        return len(self.info["label"])

    @property
    def multi_label(self) -> bool:
        """Several findings per image (chestmnist): no one class to condition on or draw by."""
        return self.info["task"].startswith("multi-label")

    @property
    def class_names(self) -> list[str]:
        """Short names in label order ("immature granulocytes(myelocytes, ...)" is cut)."""
        labels = self.info["label"]
        return [labels[str(i)].split("(")[0].strip() for i in range(self.num_classes)]

    @property
    def symmetries(self) -> str:
        """The augmentation that keeps this dataset's images possible: "symmetry", "flip" or "none"."""
        return SYMMETRIES[self.name]

    def check_augmentation(self, operations: tuple[str, ...]) -> None:
        """Warn where an augmentation (utils/augment.py's operations) turns this dataset's images in
        a way its images never are."""
        allowed = {"symmetry": {"symmetry", "flip"}, "flip": {"flip"}, "none": set()}[self.symmetries]
        turned = [op for op in operations if op in ("symmetry", "flip") and op not in allowed]
        if turned:
            what = "an up" if self.symmetries == "flip" else "an up and a side"
            warn(f"--augment {turned[0]}: {self.name} images have {what}, so the model learns them turned "
                 f"too and may draw them so; this dataset's own is --augment {self.symmetries} (docs/datasets.md)")

    @property
    def image_shape(self) -> tuple[int, ...]:
        """One image as MedMNIST stores it: (S, S, 3) in colour, (S, S) in grey."""
        return (self.size, self.size, 3) if self.channels == 3 else (self.size, self.size)

    def __str__(self) -> str:
        return f"{self.name} at {self.size}x{self.size}"


def balanced_labels(n: int, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """n labels with every class n // C or n // C + 1 times: 0, 1, ..., C-1, 0, 1, ..."""
    return torch.arange(n, device=device) % num_classes


def grid_labels(num_classes: int, per_row: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Labels for a grid of `per_row` columns that shows one class per row: 0 x per_row, 1 x per_row, ..."""
    return torch.arange(num_classes, device=device).repeat_interleave(per_row)


@dataclass
class Split:
    images: np.ndarray  # (N, S, S, 3) or (N, S, S) uint8
    labels: np.ndarray  # (N,) int64 class ids, or (N, L) 0/1 int64 for a multi-label set
    num_classes: int  # the dataset's classes (L for a multi-label set), present here or not

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def multi_label(self) -> bool:
        return self.labels.ndim == 2

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else self.images.shape[-1]


_digests = {}  # (path, size, mtime) -> MD5: a file read once per process, however often it is asked for


def md5(path: Path) -> str:
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        _digests[key] = _md5(path)
    return _digests[key]


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def locate(dataset: Dataset, data_root: str | os.PathLike, download: bool = True) -> Path:
    """The npz to read: `data_root` itself if it is a file, else `data_root/<dataset's file>`,
    downloaded through MedMNIST's URL (MD5-checked) when it is missing."""
    root = Path(data_root)
    if root.is_file():
        return root
    if root.suffix == ".npz":
        raise UserError(f"{root} not found; --data-root takes an existing .npz file or a folder")
    path = root / dataset.filename
    if path.is_file():
        return path
    url, md5 = dataset.url, dataset.md5
    hint = (f"download {url} (MD5 {md5}) by hand and pass --data-root with the folder "
            f"that holds {dataset.filename} (or the file itself)")
    if not download:
        raise UserError(f"{path} not found; {hint}")
    from torchvision.datasets.utils import download_url
    try:
        root.mkdir(parents=True, exist_ok=True)
        print(f"Downloading {dataset.filename} ({url}) to {root}/ ...")
        with atomic_write(path) as partial:  # the real name appears only once the MD5 checks
            download_url(url, str(root), filename=partial.name, md5=md5)  # raises on a mismatch
    except Exception as e:  # network, disk or checksum: all end in the same advice
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} not found and the download failed ({reason}); {hint}") from None
    return path


def _check_split(dataset: Dataset, path: Path, npz, split: str) -> Split:
    images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    want = "(N, " + ", ".join(map(str, dataset.image_shape)) + ")"
    if images.dtype != np.uint8:
        raise UserError(f"{path}: {split}_images has dtype {images.dtype}, expected uint8 "
                        "(0..255) as in MedMNIST")
    if images.shape[1:] != dataset.image_shape:
        colour = "RGB" if dataset.channels == 3 else "grayscale"
        raise UserError(f"{path}: {split}_images has shape {images.shape}, expected {want} for {dataset} "
                        f"({colour}); use {dataset.filename}, or pass the --dataset and --size it was made for")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: {split}_labels has dtype {labels.dtype}, expected integers")
    columns = dataset.num_classes if dataset.multi_label else 1
    shapes = [(len(images), columns)] + ([(len(images),)] if columns == 1 else [])  # class ids: (N, 1) or (N,)
    if labels.shape not in shapes:
        raise UserError(f"{path}: {split}_labels has shape {labels.shape}, expected ({len(images)}, {columns}) "
                        f"to match {split}_images" + (f" (one 0/1 column per finding of {dataset.name})"
                                                      if dataset.multi_label else ""))
    labels = labels.astype(np.int64)
    top = 1 if dataset.multi_label else dataset.num_classes - 1
    if labels.size and (labels.min() < 0 or labels.max() > top):
        raise UserError(f"{path}: {split}_labels holds values in {labels.min()}..{labels.max()}, "
                        f"expected 0..{top} for {dataset.name}")
    return Split(images, labels if dataset.multi_label else labels.reshape(-1), dataset.num_classes)


def load(dataset: Dataset, data_root: str | os.PathLike = "data", splits=SPLITS,
         subset: int | None = None, download: bool = True) -> dict[str, Split]:
    """Read and check the dataset's npz; `subset` keeps the first N training images.

    Every problem a user can cause (no file, a broken file, wrong keys, dtypes, shapes or
    labels) raises UserError with a one-line message; a file that is not the official one
    (another MD5) loads with a warning, since people build their own copies.
    """
    path = locate(dataset, data_root, download)
    official = dataset.md5
    if path.name == dataset.filename and (digest := md5(path)) != official:
        warn(f"{path} has MD5 {digest}, not the official {official}; using it as it is")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not an .npz file (a MedMNIST file is a zip archive of arrays); "
                        "delete it to download it again, or point --data-root at a good copy")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")
                       if f"{s}_{k}" not in npz.files]
            if missing:
                raise UserError(f"{path} lacks {', '.join(missing)}; a MedMNIST npz holds "
                                "train/val/test _images and _labels")
            out = {s: _check_split(dataset, path, npz, s) for s in splits}
    except UserError:
        raise
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise UserError(f"{path} is damaged: an array in it cannot be read (ValueError); "
                            "delete it to download it again, or point --data-root at a good copy") from None
        raise UserError(f"{path} holds pickled Python objects, which are never loaded (they can run "
                        "code); store the images and labels as plain numeric arrays") from None
    except Exception as e:  # zip or header errors from numpy: all mean a broken file
        raise UserError(f"{path} is damaged: an array in it cannot be read ({type(e).__name__}); "
                        "delete it to download it again, or point --data-root at a good copy") from None
    if "train" in out and not len(out["train"]):
        raise UserError(f"{path} holds no training images")
    if subset is not None:
        if subset < 1:
            raise UserError(f"--subset must be at least 1, got {subset}")
        t = out["train"]
        if subset > len(t):
            warn(f"--subset {subset} is more than the {len(t):,} training images of {path}; all are used")
        out["train"] = Split(t.images[:subset], t.labels[:subset], t.num_classes)
    return out


def as_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images as MedMNIST stores them, (N, H, W, 3) or grayscale (N, H, W) -> a tensor view
    (N, C, H, W), no copy."""
    t = torch.from_numpy(images)
    return t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)


def as_array(images: torch.Tensor) -> np.ndarray:
    """The inverse of as_tensor: uint8 (N, C, H, W) -> (N, H, W, 3) or (N, H, W) on the CPU, as
    MedMNIST stores them."""
    return (images[:, 0] if images.shape[1] == 1 else images.permute(0, 2, 3, 1)).cpu().numpy()


def to_float(images: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in value_range: (0, 1) for the VAE, (-1, 1) for the GAN."""
    lo, hi = value_range
    return images.float().mul_((hi - lo) / 255.0).add_(lo)


def to_uint8(images: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """The inverse of to_float, rounded and clamped: float (B, C, H, W) -> uint8."""
    lo, hi = value_range
    return ((images - lo) * (255.0 / (hi - lo))).round_().clamp_(0, 255).to(torch.uint8)


class Batches:
    """Minibatches of one split as float tensors on `device`, with their labels.

    The uint8 images are copied to the device once (150 MB for the training split) when they
    fit in a quarter of its free memory, so a step never waits for a host-to-device copy or a
    per-image transform; otherwise they stay in host memory and each batch is copied through
    pinned memory, asynchronously. channels_last keeps them NHWC, the npz's own layout and the
    fast one for convolutions. Each epoch's order comes from a generator seeded by (seed,
    epoch), so any epoch, or the rest of one, can be replayed exactly: that is what makes
    --resume bit-exact. With shuffle=False the split is walked in order and the last short batch
    is kept (evaluation); with shuffle=True it is dropped (training), unless the split is smaller
    than one batch.

    Under torchrun, batch_size is the global batch: every process draws the same order and
    takes its own equal, disjoint share of each batch (rank r of n: images r*b..(r+1)*b-1 of it,
    b = batch_size / n), so all take the same number of steps.
    """

    def __init__(self, split: Split, batch_size: int, device: torch.device | str,
                 value_range: tuple[float, float], shuffle: bool = True, seed: int = 0,
                 channels_last: bool = False, rank: int = 0, world_size: int = 1):
        if world_size > 1 and len(split) < batch_size:
            raise UserError(f"the training split has {len(split)} images, fewer than one global batch "
                            f"(--batch-size {batch_size}); lower --batch-size")
        self.device = torch.device(device)
        images = as_tensor(split.images).contiguous(memory_format=memory_format(channels_last))
        self.resident = self.device.type == "cpu" or _fits(images, self.device)
        self.images = images.to(self.device) if self.resident else images
        self.labels = torch.from_numpy(split.labels).to(self.device)
        self.batch_size, self.value_range = batch_size, value_range
        self.shuffle, self.seed = shuffle, seed
        self.rank, self.share = rank, batch_size // world_size

    def __len__(self) -> int:
        n, b = len(self.labels), self.batch_size
        return max(1, n // b) if self.shuffle else -(-n // b)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.labels))
        seed = int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0])
        return torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(seed))

    def epoch(self, epoch: int, start: int = 0):
        """Yields (x, y) for steps start..len(self)-1 of this epoch."""
        order = self.order(epoch)
        if self.resident:
            order = order.to(self.device)
        for i in range(start, len(self)):
            first = i * self.batch_size + self.rank * self.share  # this process's share of batch i
            idx = order[first:first + self.share]
            x = self.images[idx]
            if not self.resident:
                x = x.pin_memory().to(self.device, non_blocking=True)
            yield to_float(x, self.value_range), self.labels[idx.to(self.device)]


def _fits(images: torch.Tensor, device: torch.device) -> bool:
    """Whether the uint8 images take at most a quarter of the device's free memory."""
    if device.type != "cuda":
        return True  # MPS shares the host's memory
    free, _ = torch.cuda.mem_get_info(device)
    return images.numel() * images.element_size() <= free // 4
