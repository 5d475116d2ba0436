"""Pictures: sample grids (a class per row when labelled) and metric curves, written atomically."""
from pathlib import Path

import torch

from system import files


def save_figure(path: Path, write) -> None:
    """write(file, format) into a temporary file that then replaces `path` (making its folder):
    a crash never leaves half a picture. The format follows the name (png, jpg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_write(path) as tmp:
        write(tmp, path.suffix.lstrip(".").lower().replace("jpg", "jpeg"))


PICTURES = (".png", ".jpg", ".jpeg")  # what save_grid and the figures write


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, row_labels: list[str] | None = None) -> None:
    """images (B, C, H, W) in [0, 1] -> one picture, `nrow` images a row, 2-pixel gaps.
    With row_labels, each row is labelled on the left (a class per row)."""
    from torchvision.utils import make_grid, save_image
    images = images.detach().float().clamp(0, 1).cpu()
    if row_labels is None:
        save_figure(path, lambda f, fmt: save_image(images, f, nrow=nrow, padding=2, pad_value=1.0, format=fmt))
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0).permute(1, 2, 0).numpy()
    h, w = grid.shape[:2]
    fig = plt.figure(figsize=(w / 100 + 1.9, h / 100), dpi=100)
    ax = fig.add_axes([1.9 / (w / 100 + 1.9), 0, 1 - 1.9 / (w / 100 + 1.9), 1])
    ax.imshow(grid, interpolation="nearest")
    row_h = (h - 2) / len(row_labels)
    ax.set_yticks([2 + row_h * (i + 0.5) for i in range(len(row_labels))], row_labels, fontsize=10)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    save_figure(path, lambda f, fmt: fig.savefig(f, dpi=100, format=fmt))
    plt.close(fig)


def plot_curves(records: list[dict], path: Path, panels: list[tuple[str, list[str], float | None]]) -> None:
    """One panel per (title, metric keys, optional horizontal reference line), against epoch;
    panels with none of their keys in the records are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [p for p in panels if any(k in r for k in p[1] for r in records)]  # e.g. no KID logged
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys, hline) in zip(axes[0], panels):
        for k in keys:
            logged = [r for r in records if k in r]  # e.g. KID only every --eval-every epochs
            if logged:
                ax.plot([r["epoch"] for r in logged], [r[k] for r in logged], marker=".", label=k)
        if hline is not None:
            ax.axhline(hline, color="gray", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(path, lambda f, fmt: fig.savefig(f, dpi=100, format=fmt))
    plt.close(fig)
