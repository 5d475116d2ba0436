"""How fast this repo trains and evaluates, against the training loop most tutorials write.

    python bench.py                                     # every workload on the best device
    python bench.py --workloads gan-default gan-bce --device cpu --json outputs/bench.json
    python bench.py --precision bf16 --compile          # the trade-offs the training scripts offer
    python bench.py --dataset pathmnist --size 128      # another MedMNIST set, another size

For each workload it times two ways of doing the same work on the same model and batch size:

  ours      the training scripts' own step (GANTrainer, VAETrainer): images
            resident on the device as uint8, channels-last, fused Adam, --precision (auto: bf16
            where the hardware has it), losses left on the device; for "features", evaluate.py's
            feature pass (evaluation/features.py predict) on uint8 images.
  baseline  the usual loop: a Dataset that turns each image into a PIL image and runs
            torchvision transforms, a DataLoader with 2 workers, fp32, the default memory format,
            plain Adam, and .item() on the losses after every step.

Warm-up steps are not timed; each figure is the median of --repeats timings of --steps steps,
ours and the baseline taking turns. "s/epoch" is the official training split (11,959 images for
BloodMNIST) divided by the rate. This is a benchmark, not a test: it prints numbers and asserts nothing about them.
It is the one script that imports the training scripts, since it times exactly their step.
"""
import itertools
import json
import multiprocessing
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from tqdm import tqdm

import train_gan
import train_vae
from data import Batches, Dataset, as_tensor, load
from evaluation import features
from models import dcgan, vae
from models.classifier import Classifier
from models.dcgan import discriminator_loss, generator_loss, gradient_penalty
from system import errors, files, hardware
from utils import checkpoint, cli
from utils.log import Meter
from utils.training import set_seed

# gan-default and vae-default are the training scripts' default recipes (the GAN's augmentation,
# EMA and R1 on every 16th batch; the VAE-GAN's discriminator), what a run costs; the gan-LOSS
# workloads are the paper recipe with that loss, and vae the plain recipe, the same work as the
# baseline loop does.
WORKLOADS = ("gan-default", "gan-bce", "gan-hinge", "gan-wgan-gp", "vae-default", "vae", "features")


def build_parser():
    p = cli.make_parser(__doc__)
    p.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS), metavar="NAME",
                   help=f"what to time, any of: {', '.join(WORKLOADS)}")
    cli.add_dataset_args(p)
    cli.add_device_and_data(p)
    p.add_argument("--batch-size", type=cli.positive_int, default=None, metavar="N",
                   help="images per training step (default: the training script's own, 32 for gan-default, "
                        "64 for the paper recipe's gan-LOSS, 16 for vae-default, 32 for vae)")
    p.add_argument("--feature-batch-size", type=cli.positive_int, default=500, metavar="N",
                   help="images per batch of the feature pass (evaluate.py's)")
    p.add_argument("--steps", type=cli.positive_int, default=10, metavar="N", help="steps per timing")
    p.add_argument("--repeats", type=cli.positive_int, default=3, metavar="R", help="timings per number (median)")
    p.add_argument("--warmup", type=cli.positive_int, default=3, metavar="N", help="untimed steps first")
    p.add_argument("--workers", type=cli.non_negative_int, default=2, metavar="N",
                   help="DataLoader workers of the baseline (pytorch/examples uses 2)")
    p.add_argument("--no-baseline", action="store_true", help="time our path only")
    p.add_argument("--json", metavar="FILE", help="also write the rows as a JSON list")
    p.add_argument("--overwrite", action="store_true", help="let --json replace an existing file")
    cli.add_speed_args(p)
    return p


# ---------------------------------------------------------------- the usual loop, as tutorials write it

class PILDataset(torch.utils.data.Dataset):
    """Each image becomes a PIL image and goes through torchvision transforms, one at a time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), torch.as_tensor(self.labels[i])


def forever(loader):
    """Batches of a DataLoader epoch after epoch (a new epoch restarts its workers, as in a real loop)."""
    while True:
        yield from loader


def to_symmetric():
    """PIL image -> tensor in [-1, 1], for any number of channels (ToTensor, then Normalize(0.5, 0.5))."""
    return T.Compose([T.ToTensor(), T.Normalize(0.5, 0.5)])


def baseline_loader(split, transform, batch_size: int, workers: int, shuffle: bool = True):
    dataset = PILDataset(split.images, split.labels, transform)
    return forever(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                               num_workers=workers, drop_last=shuffle))


def baseline_gan(args, split, device, workers: int):
    """pytorch/examples' DCGAN loop (and its WGAN-GP cousin) on our G and D."""
    networks = dcgan.build(vars(args), Dataset(args.dataset, args.size))
    G, D = networks["G"].to(device), networks["D"].to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    batches = baseline_loader(split, to_symmetric(), args.batch_size, workers)
    counter = itertools.count(1)

    def step():
        real, _ = next(batches)
        real = real.to(device)
        fake = G(torch.randn(real.size(0), args.latent_dim, device=device))
        D.zero_grad()
        loss_d = discriminator_loss(args.loss, D(real), D(fake.detach()))
        if args.loss == "wgan-gp":
            loss_d = loss_d + args.gp_weight * gradient_penalty(D, real, fake.detach())
        loss_d.backward()
        opt_d.step()
        stats = [loss_d.item()]
        if next(counter) % args.n_critic == 0:
            G.zero_grad()
            loss_g = generator_loss(args.loss, D(fake))
            loss_g.backward()
            opt_g.step()
            stats.append(loss_g.item())
        return stats
    return step


def baseline_vae(args, split, device, workers: int):
    """pytorch/examples' VAE loop on our VAE and its loss."""
    model = vae.build(vars(args), Dataset(args.dataset, args.size))["vae"].to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    batches = baseline_loader(split, T.ToTensor(), args.batch_size, workers)

    def step():
        x, _ = next(batches)
        x = x.to(device)
        opt.zero_grad()
        logits, mu, logvar = model(x)
        loss = model.loss(x, logits, mu, logvar)["loss"]
        loss.backward()
        opt.step()
        return loss.item()
    return step


def baseline_features(model, split, batch_size: int, device, workers: int):
    batches = baseline_loader(split, to_symmetric(), batch_size, workers, shuffle=False)

    @torch.no_grad()
    def step():
        x, _ = next(batches)
        return model.features(x.to(device)).cpu()
    return step


# ---------------------------------------------------------------- our path: the training scripts' own steps

def cycle_batches(batches):
    for epoch in itertools.count():
        yield from batches.epoch(epoch)


def ours_training(train, batches: Batches):
    """train(x, labels, batch_index, meter) on the run's own batches, reading the losses every 10
    steps as the training loop does."""
    data, meter, counter = cycle_batches(batches), Meter(), itertools.count(1)

    def step():
        x, y = next(data)
        i = next(counter)
        train(x, y, i, meter)
        if i % 10 == 0:
            meter.means()
    return step


def ours_features(model, images: torch.Tensor, batch_size: int):
    starts = itertools.cycle(range(0, len(images) - batch_size + 1, batch_size))

    def step():
        i = next(starts)
        return features.predict(model, images[i:i + batch_size], batch_size)
    return step


# ---------------------------------------------------------------- timing

def rate(step, images_per_step: int, steps: int, device: torch.device) -> float:
    """Images per second over `steps` calls of step, waiting for the device at both ends."""
    hardware.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    hardware.synchronize(device)
    return steps * images_per_step / (time.perf_counter() - t0)


def training_args(workload: str, opts) -> object:
    """The training script's own defaults for this workload, with the bench's speed flags."""
    flags = ["--dataset", opts.dataset, "--size", str(opts.size),
             "--precision", opts.precision, "--channels-last" if opts.channels_last else "--no-channels-last",
             *(["--compile"] if opts.compile else []), *(["--batch-size", str(opts.batch_size)] if opts.batch_size else [])]
    if workload == "vae":
        flags += ["--recipe", "plain"]
    elif workload.startswith("gan-") and workload != "gan-default":
        flags += ["--recipe", "paper", "--loss", workload.removeprefix("gan-")]
    script = train_vae if workload.startswith("vae") else train_gan
    args = script.build_parser().parse_args(flags)
    script.fill_defaults(args)
    return args


def make_step(path: str, workload: str, opts, device: torch.device, split):
    """(step, images per step) of one path for one workload."""
    if workload == "features":
        data = Dataset(opts.dataset, opts.size)
        net = Classifier(data.num_classes, data.channels, tuple(features.RECIPE["widths"])).to(device).eval()
        if path == "baseline":
            return baseline_features(net, split, opts.feature_batch_size, device, opts.workers), opts.feature_batch_size
        images = as_tensor(split.images)  # uint8, as evaluate.py holds them
        net = net.to(memory_format=hardware.memory_format(opts.channels_last))
        return ours_features(net, images, opts.feature_batch_size), opts.feature_batch_size
    args = training_args(workload, opts)
    if path == "baseline":
        make = baseline_vae if workload.startswith("vae") else baseline_gan
        return make(args, split, device, opts.workers), args.batch_size
    kind = "vae" if workload.startswith("vae") else "gan"
    script = train_vae if kind == "vae" else train_gan
    batches = Batches(split, args.batch_size, device, script.VALUE_RANGE, channels_last=args.channels_last)
    networks = checkpoint.networks(kind, vars(args), Dataset(args.dataset, args.size))
    if script is train_vae:
        trainer = train_vae.VAETrainer(args, networks, device)
        return ours_training(lambda x, y, i, meter: trainer.step(x, y, meter), batches), args.batch_size
    trainer = train_gan.GANTrainer(args, networks, device)
    return ours_training(lambda x, y, i, meter: trainer.step(x, None, i, meter), batches), args.batch_size


def serve(path: str, workload: str, opts, conn, warned: set) -> None:
    """One path of one workload in a process of its own (so that neither path's allocator
    settings, threads or DataLoader workers touch the other's timings): build, warm up, say
    'ready', then answer each 'time' with images per second until 'stop'."""
    errors.warned.update(warned)  # the parent has already said what there was to say
    try:
        device = hardware.pick_device(opts.device)
        if path == "ours":
            hardware.speed_up(device)
        split = load(Dataset(opts.dataset, opts.size), opts.data_root, splits=("train",))["train"]
        set_seed(0)
        step, batch = make_step(path, workload, opts, device, split)
        for _ in range(opts.warmup):
            step()
        conn.send("ready")
        while conn.recv() == "time":
            conn.send(rate(step, batch, opts.steps, device))
    except Exception as e:  # reported by the parent in one line
        conn.send(f"error: {type(e).__name__}: {e}")


def time_workload(workload: str, opts) -> dict[str, list[float]]:
    """Median-ready lists of images/s per path, the paths taking turns."""
    paths = ["ours"] if opts.no_baseline else ["ours", "baseline"]
    ctx = multiprocessing.get_context("spawn")
    conns, procs = {}, []
    for path in paths:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=serve, args=(path, workload, opts, child, set(errors.warned)), daemon=False)
        proc.start()
        conns[path], procs = parent, procs + [proc]
    rates = {path: [] for path in paths}
    try:
        for path in paths:  # every path is warm before any is timed
            reply = conns[path].recv()
            if reply != "ready":
                raise errors.UserError(f"{workload}, {path}: {reply}")
        with tqdm(total=len(paths) * opts.repeats, desc=workload, dynamic_ncols=True, leave=False) as bar:
            for _ in range(opts.repeats):
                for path in paths:
                    conns[path].send("time")
                    reply = conns[path].recv()
                    if isinstance(reply, str):
                        raise errors.UserError(f"{workload}, {path}: {reply}")
                    rates[path].append(reply)
                    bar.update()
                    bar.set_postfix({k: f"{statistics.median(v):.0f} img/s" for k, v in rates.items() if v})
    finally:
        for path, proc in zip(paths, procs):
            if proc.is_alive():
                try:
                    conns[path].send("stop")
                except OSError:
                    pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
    return rates


def main(argv=None):
    opts = build_parser().parse_args(argv)
    device = hardware.pick_device(opts.device)
    if opts.json:
        files.check_output(opts.json, "--json", (".json",), opts.overwrite)
    data = Dataset(opts.dataset, opts.size)
    split = load(data, opts.data_root, splits=("train",))["train"]  # checks the file before any process starts
    train_images = data.info["n_samples"]["train"]  # the official split, for s/epoch
    batch_sizes = {w: opts.feature_batch_size if w == "features" else training_args(w, opts).batch_size
                   for w in opts.workloads}
    if len(split) < max(batch_sizes.values()):
        raise errors.UserError(f"the training split has {len(split)} images, fewer than one batch; "
                               "lower --batch-size / --feature-batch-size")
    name = hardware.device_name(device)
    precision = hardware.Precision(opts.precision, device).name
    print(f"bench on {device} ({name}), {data}: ours in {precision}{', compiled' if opts.compile else ''}"
          f"{', channels-last' if opts.channels_last else ''}; the baseline in fp32 with {opts.workers} "
          f"DataLoader workers; median of {opts.repeats} x {opts.steps} steps after {opts.warmup} warm-up")
    rows = []
    for workload in opts.workloads:
        rates = time_workload(workload, opts)
        ours = statistics.median(rates["ours"])
        base = statistics.median(rates["baseline"]) if "baseline" in rates else None
        rows.append({"workload": workload, "dataset": data.name, "size": data.size,
                     "device": name, "precision": precision, "compile": opts.compile,
                     "channels_last": opts.channels_last, "batch_size": batch_sizes[workload],
                     "images_per_s": round(ours, 1),
                     "baseline_images_per_s": None if base is None else round(base, 1),
                     "speedup": None if base is None else round(ours / base, 2),
                     "epoch_s": round(train_images / ours, 2),
                     "baseline_epoch_s": None if base is None else round(train_images / base, 2)})
        print_row(rows[-1], header=len(rows) == 1)
    if opts.json:
        path = Path(opts.json)
        note = files.write_output_text(path, json.dumps(rows, indent=2) + "\n")
        print(f"wrote {path}{note}")


def print_row(row: dict, header: bool) -> None:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    if header:
        print(f"{'workload':<12} {'ours img/s':>11} {'baseline img/s':>15} {'speedup':>8} {'s/epoch':>8} {'baseline s/epoch':>17}")
    print(f"{row['workload']:<12} {row['images_per_s']:>11.1f} {fmt(row['baseline_images_per_s'], '>15.1f')} "
          f"{fmt(row['speedup'], '>7.2f')}{'' if row['speedup'] is None else 'x'} {row['epoch_s']:>8.2f} "
          f"{fmt(row['baseline_epoch_s'], '>17.2f')}")


if __name__ == "__main__":
    cli.run_main(main)
