"""Draw from a trained checkpoint of train_gan.py or train_vae.py: grids, synthetic datasets,
interpolations and, for the VAE, latent arithmetic and a map of the latent space.

    python sample.py outputs/gan/ckpt.pt                        # 64 samples -> outputs/gan/samples.png
    python sample.py outputs/cgan/ckpt.pt --class neutrophil    # one cell type (conditional runs)
    python sample.py outputs/cgan/ckpt.pt --n 8000 --npz synthetic.npz   # a MedMNIST-format dataset
    python sample.py outputs/cgan/ckpt.pt --medmnist synthetic/           # a drop-in for the real dataset
    python sample.py outputs/gan/ckpt.pt --interpolate          # rows that walk between latent points
    python sample.py outputs/vae/ckpt.pt --arithmetic lymphocyte neutrophil
    python sample.py outputs/vae/ckpt.pt --latent-map           # PCA and t-SNE of mu, by class

The dataset and size (train_*.py --dataset, --size) come from the checkpoint too.

The model's settings come from the checkpoint; nothing needs repeating. Runs with --ema draw from
the averaged generator unless --no-ema is given.
"""
import json
import math
from pathlib import Path

import numpy as np
import torch

from data import SPLITS, Batches, Dataset, as_array, balanced_labels, grid_labels, load, locate, md5
from evaluation.distances import class_shares, proportional_labels
from evaluation.features import feature_network, predict
from models.vae import PRIORS, TEMPERATURES, VAE
from system import errors, files, hardware
from utils import cli, pictures
from utils.checkpoint import Trained, load_trained
from utils.sampling import class_draws, draw, fixed_noise, use_density


def parse_args(argv=None):
    p = cli.make_parser(__doc__)
    p.add_argument("checkpoint", help="ckpt.pt written by train_gan.py or train_vae.py")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--interpolate", action="store_true",
                      help="rows that walk between pairs of random latent points (spherical)")
    mode.add_argument("--arithmetic", nargs=2, metavar=("FROM", "TO"),
                      help="VAE: move real FROM-class images towards TO: z - mean(FROM) + mean(TO)")
    mode.add_argument("--latent-map", action="store_true",
                      help="VAE: the encoder's mu over --split in 2-D (PCA and t-SNE), by class")
    p.add_argument("--n", type=cli.positive_int, default=None, metavar="N",
                   help="images to draw (default 64; 8 per class for a conditional grid), or rows of "
                        "--interpolate / --arithmetic (default 8)")
    p.add_argument("--npz", metavar="FILE", default=None,
                   help="write the N images as a MedMNIST-format npz (train split) instead of a grid")
    p.add_argument("--medmnist", metavar="DIR", default=None,
                   help="write DIR/<the dataset's MedMNIST file name>: a synthetic train split (N: the official "
                        "count, in the real classes' shares) and the real val and test splits, which medmnist's "
                        "own dataset classes and any MedMNIST pipeline load as the real dataset")
    p.add_argument("--feature-cache", default="outputs/features", metavar="DIR",
                   help="--medmnist on a model that draws no classes: where evaluate.py's classifier, which "
                        "names the classes of its samples, is cached")
    p.add_argument("--class", dest="cls", metavar="NAME|ID", default=None,
                   help="draw only this cell type: conditional runs, and VAEs from their class mixture "
                        "(default: every class; a row each for conditional runs)")
    p.add_argument("--steps", type=cli.positive_int, default=8, help="columns of --interpolate / --arithmetic")
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="split for --arithmetic means (default train) and --latent-map (default test)")
    p.add_argument("--no-ema", action="store_true", help="use the raw generator of an --ema run")
    p.add_argument("--prior", choices=PRIORS, default=None,
                   help="VAE: draw z from a Gaussian fitted to each class's training codes, in the classes' "
                        "shares (classes; the default), one Gaussian fitted to all of them (gaussian; the default "
                        "for a multi-label set), or the prior it trained with (standard: N(0, I), or p(z | y) of "
                        "a conditional VAE)")
    p.add_argument("--temperature", type=cli.positive_float, default=None, metavar="T",
                   help="scale of the noise each draw starts from: below 1 the draws keep nearer the latent "
                        "density's mean (more typical images, less variety), above 1 further out (default: "
                        f"{TEMPERATURES['classes']:g} for the VAE's classes density, where it drew the best samples; "
                        "else 1)")
    p.add_argument("--out", metavar="FILE", default=None,
                   help="output .png or .jpg (default: a name for the mode beside the checkpoint, replaced "
                        "on each call)")
    p.add_argument("--overwrite", action="store_true",
                   help="let --out or --npz replace an existing file (never a checkpoint or a dataset)")
    p.add_argument("--seed", type=int, default=0, help="seeds the latent draws")
    p.add_argument("--batch-size", type=cli.positive_int, default=256, help="images per forward pass")
    cli.add_device_and_data(p, data_root=None)
    return p.parse_args(argv)


def parse_class(text: str, data: Dataset) -> int:
    names = data.class_names
    if text.isdigit() and int(text) < data.num_classes:
        return int(text)
    matches = [i for i, name in enumerate(names) if name.lower().startswith(text.lower())]
    if len(matches) != 1:
        raise errors.UserError(f"unknown class {text!r} of {data.name}; use an id 0..{data.num_classes - 1} or one of: "
                               + ", ".join(names))
    return matches[0]


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of z0 and z1 (White, 2016): for Gaussian latents it
    keeps the norm typical, where a straight line passes through unlikely, short vectors.
    z0, z1 (R, D), t (T,) -> (R, T, D)."""
    cos = torch.nn.functional.cosine_similarity(z0, z1, dim=1).clamp(-1, 1)[:, None, None]
    omega = torch.acos(cos)
    t = t[None, :, None]
    small = omega.abs() < 1e-4  # nearly parallel: the straight line is the same path
    sin = torch.sin(omega).clamp_min(1e-8)
    a = torch.where(small, 1 - t, torch.sin((1 - t) * omega) / sin)
    b = torch.where(small, t, torch.sin(t * omega) / sin)
    return a * z0[:, None] + b * z1[:, None]


def write_npz(path: Path, images: torch.Tensor, labels: torch.Tensor | np.ndarray, source: str,
              about: dict, real: dict[str, np.ndarray] | None = None) -> None:
    """uint8 images (N, C, S, S) and labels (N,) or (N, L) -> MedMNIST layout: train_images uint8
    (N, S, S, 3) or (N, S, S) in grey, train_labels (N, 1) or (N, L); val and test as `real` holds
    them (the arrays of a real file), else present and empty, so the file loads with data.py and
    with code written for MedMNIST. `source` (the checkpoint) is kept under SYNTHETIC_MARK, and
    `about` (what each split is, the checkpoint's MD5) as JSON under "synthetic_about"."""
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    labels = labels.astype(np.uint8).reshape(len(labels), -1)
    arrays = {"train_images": as_array(images), "train_labels": labels,
              files.SYNTHETIC_MARK: np.array(source),  # so that --overwrite may replace it, and no dataset
              "synthetic_about": np.array(json.dumps(about))}
    for split in ("val", "test"):
        empty = (np.zeros((0, *arrays["train_images"].shape[1:]), np.uint8), np.zeros((0, labels.shape[1]), np.uint8))
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = \
            (real[f"{split}_images"], real[f"{split}_labels"]) if real else empty
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_write(path) as tmp, open(tmp, "wb") as f:  # a file: numpy adds no .npz
        np.savez_compressed(f, **arrays)


def about_checkpoint(args, trained: Trained) -> dict:
    """What the train split of an export is: its checkpoint by path, epoch and MD5, and the draws."""
    return {"train": "synthetic", "checkpoint": str(args.checkpoint), "checkpoint_md5": md5(Path(args.checkpoint)),
            "epochs": trained.epochs, "ema": trained.ema, "seed": args.seed, "temperature": args.temperature,
            "prior": getattr(trained.model, "density", None)}


def drop_in(trained: Trained, args, out: Path, cls: int | None) -> None:
    """The dataset this model imitates, in MedMNIST's own file: a synthetic train split in the real
    training shares (drawn by class where the model can, else named by evaluate.py's classifier of
    the real data), and the val and test splits of the user's real file, copied."""
    data, n = trained.data, args.n
    official = data.info["n_samples"]
    splits = load(data, args.data_root)
    real_path = locate(data, args.data_root)
    trained.real_data(real_path)
    odd = [f"{s} {len(splits[s]):,}" for s in ("val", "test") if len(splits[s]) != official[s]]
    if odd:
        errors.warn(f"{real_path} holds {' and '.join(odd)} images where MedMNIST's record says val "
                    f"{official['val']:,} and test {official['test']:,}: copied as they are, but medmnist's dataset "
                    "classes refuse len() on a split whose count differs from the record")
    if n != official["train"]:
        errors.warn(f"--n {n:,}: medmnist's dataset classes refuse len() on a train split of other than the "
                    f"official {official['train']:,} images (indexing still works); leave --n out for a drop-in")
    noise = fixed_noise(n, trained.model.latent_dim, args.seed, trained.device)
    about = about_checkpoint(args, trained)
    if trained.model.draws_classes:  # exact real shares, in a seeded order
        y = proportional_labels(n, class_shares(splits["train"].labels, data.num_classes), args.seed + 5)
        images = draw(trained.model, noise, y.to(trained.device), args.temperature, args.batch_size, uint8=True,
                      desc="drawing")
        labels, about["labels"] = y.numpy(), "the classes asked for, in the real training split's shares"
    else:
        images = draw(trained.model, noise, None, args.temperature, args.batch_size, uint8=True, desc="drawing")
        classifier, info = feature_network(data, args.data_root, trained.device, args.feature_cache)
        logits = predict(classifier, images, desc="naming classes")[1]
        labels = (logits > 0).numpy() if data.multi_label else logits.argmax(1).numpy()
        about["labels"] = (f"named by evaluate.py's classifier of the real data ({info['file']}, test accuracy "
                           f"{info['test_accuracy']}), since this model draws no classes")
    with np.load(real_path) as f:
        real = {k: f[k] for k in ("val_images", "val_labels", "test_images", "test_labels")}
    about.update(val="real", test="real", real_file=str(real_path), real_md5=md5(real_path))
    write_npz(out, images, labels, str(args.checkpoint), about, real)
    print(f"Train split: {n:,} synthetic images ({about['labels']}); val and test: copied from {real_path}")


@torch.no_grad()
def encode_split(trained: Trained, args, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The VAE's mu over one split: (mu (N, D), labels (N,) or (N, L), images (N, C, S, S) uint8)."""
    data = load(trained.data, args.data_root, splits=(split,))[split]
    trained.real_data(locate(trained.data, args.data_root))
    if len(data) < 2:
        raise errors.UserError(f"the {split} split of {args.data_root} has {len(data)} images, too few to "
                               "compare; choose another --split")
    batches = Batches(data, args.batch_size, trained.device, (0.0, 1.0), shuffle=False)
    mus = [trained.model.encode(x, y if trained.conditional else None)[0] for x, y in batches.epoch(0)]
    return torch.cat(mus), batches.labels, batches.images


def labels_for(trained: Trained, n: int, cls: int | None, seed: int, by_row: bool = False) -> torch.Tensor | None:
    """The classes to draw: all `cls`; every class in turn for a conditional model; the model's
    own shares for a VAE's class mixture; None for a model that draws no classes."""
    if cls is not None:
        return torch.full((n,), cls, device=trained.device)
    if not trained.conditional:
        return class_draws(trained.model, n, seed)
    classes = trained.data.num_classes
    return grid_labels(classes, n // classes, trained.device) if by_row else balanced_labels(n, classes, trained.device)


def every_class(trained: Trained, args, cls: int | None) -> bool:
    """A grid of a conditional model's classes, all of them: drawn a row per class where N allows."""
    return trained.conditional and cls is None and not args.npz and not args.medmnist


def samples(trained: Trained, args, out: Path, cls: int | None) -> None:
    """N samples to a grid PNG (a class per row for conditional runs), or to a MedMNIST npz."""
    classes = trained.data.num_classes
    by_row = every_class(trained, args, cls) and args.n % classes == 0
    y = labels_for(trained, args.n, cls, args.seed, by_row)
    noise = fixed_noise(args.n, trained.model.latent_dim, args.seed, trained.device)
    images = draw(trained.model, noise, y, args.temperature, args.batch_size, uint8=bool(args.npz))
    if args.npz:
        if y is None:
            errors.warn("this model draws no classes; train_labels are all 0 (placeholders)")
            y = torch.zeros(args.n, classes if trained.data.multi_label else 1, dtype=torch.long)
        write_npz(out, images, y, str(args.checkpoint), about_checkpoint(args, trained))
        return
    nrow, row_labels = int(math.ceil(math.sqrt(args.n))), None
    if by_row:
        nrow, row_labels = args.n // classes, trained.data.class_names
    pictures.save_grid(images, out, nrow=nrow, row_labels=row_labels)


def interpolate(trained: Trained, args, out: Path, cls: int | None) -> None:
    """Rows that walk on great circles between pairs of latent points; a class per row."""
    eps = fixed_noise(2 * args.n, trained.model.latent_dim, args.seed, trained.device)
    eps = slerp(eps[:args.n], eps[args.n:], torch.linspace(0, 1, args.steps, device=trained.device))
    y = labels_for(trained, args.n, cls, args.seed)  # a class per row
    rows = None if y is None else y[:, None].expand(-1, args.steps)
    # the great circles of N(0, I), carried into the latent density
    images = draw(trained.model, eps.flatten(0, 1), None if y is None else rows.flatten(), args.temperature, args.batch_size)
    row_labels = None if y is None else [trained.data.class_names[c] for c in y.tolist()]
    pictures.save_grid(images, out, nrow=args.steps, row_labels=row_labels)


def arithmetic(trained: Trained, args, out: Path, cls: int | None) -> None:
    """Real FROM images (first column), then decode(z + t * (mean(TO) - mean(FROM))), t = 0..1."""
    a, b = (parse_class(c, trained.data) for c in args.arithmetic)
    names, split = trained.data.class_names, args.split or "train"
    mu, labels, images = encode_split(trained, args, split)
    if not (labels == a).any() or not (labels == b).any():
        raise errors.UserError(f"the {split} split lacks {names[a]} or {names[b]} images")
    shift = mu[labels == b].mean(0) - mu[labels == a].mean(0)
    rows = torch.nonzero(labels == a).flatten()[:args.n]
    t = torch.linspace(0, 1, args.steps, device=trained.device)
    z = mu[rows][:, None] + t[None, :, None] * shift  # (R, T, D)
    with torch.no_grad():
        decoded = torch.cat([trained.model.decode(part) for part in z.flatten(0, 1).split(args.batch_size)])
    decoded = decoded.unflatten(0, (len(rows), args.steps))
    real = images[rows].float()[:, None] / 255
    pictures.save_grid(torch.cat([real, decoded], 1).flatten(0, 1), out, nrow=args.steps + 1)
    print(f"Rows: real {names[a]} images (first column), then z + t * (mean({names[b]}) - "
          f"mean({names[a]})) for t = 0..1 in {args.steps} steps")


def latent_map(trained: Trained, args, out: Path, cls: int | None) -> None:
    """The encoder's mu over --split (default test) in 2-D, PCA and t-SNE, coloured by class."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    split = args.split or "test"
    mu, labels, _ = encode_split(trained, args, split)
    mu, labels = mu.cpu().double(), labels.cpu().numpy()
    centred = mu - mu.mean(0)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    pca = (centred @ v[:2].T).numpy()
    explained = (s[:2] ** 2 / (s ** 2).sum()).tolist()
    print(f"t-SNE of {len(mu):,} points ...")
    tsne = TSNE(2, init="pca", perplexity=min(30.0, (len(mu) - 1) / 3), random_state=args.seed).fit_transform(mu.numpy())
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    names = trained.data.class_names
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    groups = [(labels == c, f"{names[c]} ({(labels == c).sum()})", colours(c)) for c in range(len(names))] \
        if labels.ndim == 1 else [(slice(None), f"all {len(labels)} images (multi-label: no one class)", "tab:blue")]
    for ax, points, title in [(axes[0], pca, f"PCA ({explained[0]:.0%} + {explained[1]:.0%} of the variance)"),
                              (axes[1], tsne, "t-SNE")]:
        for m, label, colour in groups:
            ax.scatter(points[m, 0], points[m, 1], s=4, color=colour, label=label)
        ax.set_title(title)
        ax.set_xticks([]), ax.set_yticks([])
    axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=4, frameon=False)
    fig.suptitle(f"VAE posterior means mu over the {split} split ({len(mu):,} images)")
    fig.tight_layout()
    pictures.save_figure(out, lambda f, fmt: fig.savefig(f, dpi=100, format=fmt))
    plt.close(fig)


def output_path(args, folder: Path, data: Dataset) -> Path:
    """Where this call writes, checked before any work: --npz or --out as given (an existing file
    only with --overwrite), else the mode's own name beside the checkpoint, replaced each time."""
    if args.npz:
        return files.check_output(args.npz, "--npz", (".npz",), args.overwrite, inputs=(args.checkpoint,))
    if args.medmnist:  # the real file's own name: never the real file itself
        return files.check_output(Path(args.medmnist) / data.filename, "--medmnist", (".npz",), args.overwrite,
                                  inputs=(args.checkpoint, locate(data, args.data_root)))
    if args.out:
        return files.check_output(args.out, "--out", pictures.PICTURES, args.overwrite, inputs=(args.checkpoint,))
    if args.arithmetic:
        name = "arithmetic_{}_to_{}.png".format(*(data.class_names[parse_class(c, data)] for c in args.arithmetic))
    else:
        name = "latent_map.png" if args.latent_map else "interpolation.png" if args.interpolate else "samples.png"
    return files.check_output(folder / name.replace(" ", "_"), "the output", pictures.PICTURES, overwrite=True)


def main(argv=None):
    args = parse_args(argv)
    device = hardware.pick_device(args.device)
    trained = load_trained(args.checkpoint, device, use_ema=not args.no_ema)
    use_density(trained.model, args.prior)
    args.data_root = args.data_root or trained.settings["data_root"]
    if args.cls is not None and not trained.model.draws_classes:
        raise errors.UserError(f"--class needs a conditional checkpoint or a VAE drawn from its class mixture "
                               f"(--prior classes); {args.checkpoint} is neither")
    if (args.arithmetic or args.latent_map) and not isinstance(trained.model, VAE):
        raise errors.UserError(f"--{'arithmetic' if args.arithmetic else 'latent-map'} works on the VAE's "
                               f"encoder; {args.checkpoint} is a GAN")
    if args.arithmetic and trained.data.multi_label:
        raise errors.UserError(f"--arithmetic moves images from one class to another; {trained.data.name} is "
                               "multi-label and has no one class per image")
    if args.arithmetic and trained.conditional:
        raise errors.UserError("--arithmetic needs an unconditional VAE: a conditional one keeps the "
                               "class out of z (decode with --class instead)")
    writes = "--npz" if args.npz else "--medmnist" if args.medmnist else None
    if writes and (args.interpolate or args.arithmetic or args.latent_map or (args.npz and args.medmnist)):
        raise errors.UserError(f"{writes} writes drawn samples; it does not combine with the other modes")
    if args.medmnist and args.cls is not None:
        raise errors.UserError("--medmnist writes every class in its real share; --class draws one (use --npz)")
    cls = parse_class(args.cls, trained.data) if args.cls is not None else None
    out = output_path(args, Path(args.checkpoint).parent, trained.data)
    if args.n is None:  # a conditional grid: a row of 8 per class, as in training
        by_class = every_class(trained, args, cls)
        args.n = 8 if args.interpolate or args.arithmetic else 8 * trained.data.num_classes if by_class else 64
        if args.medmnist:
            args.n = trained.data.info["n_samples"]["train"]

    mode = latent_map if args.latent_map else arithmetic if args.arithmetic else \
        interpolate if args.interpolate else drop_in if args.medmnist else samples
    note = files.replaced_note(out)
    mode(trained, args, out, cls)
    print(f"Wrote {out}{note}")


if __name__ == "__main__":
    cli.run_main(main)
