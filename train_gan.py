"""Train a DCGAN (or a WGAN-GP, hinge or class-conditional variant) on BloodMNIST-64, or on any
MedMNIST 2D dataset at any of its sizes.

    python train_gan.py                                   # DCGAN, symmetries and EMA, 25 epochs: outputs/gan/
    python train_gan.py --recipe paper --out outputs/gan_paper  # the DCGAN as published
    python train_gan.py --loss wgan-gp --out outputs/wgan # critic without BatchNorm, 5 critic steps
    python train_gan.py --conditional --out outputs/cgan  # one class per row of every grid
    python train_gan.py --resume                          # continue outputs/gan/ after Ctrl-C
    python train_gan.py --dataset pneumoniamnist --size 28  # grayscale chest X-rays: outputs/gan_pneumoniamnist_28/
    torchrun --standalone --nproc_per_node 4 train_gan.py --sync-bn   # 4 GPUs, global batch 32

Every epoch writes samples_epoch_NNN.png (the same fixed noise each time, so epochs compare; a
class per row when conditional), metrics.jsonl, curves.png and ckpt.pt into --out.
"""
import argparse

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import Dataset, balanced_labels, grid_labels
from evaluation.probe import PANELS, KIDProbe
from models.dcgan import (D_NORMS, LABEL_INPUTS, LOSSES, VALUE_RANGE, discriminator_loss, ema_decay, ema_update,
                          generator_loss, gradient_penalty, r1_penalty, recalibrate_batchnorm)
from models.sync_batchnorm import convert_sync_batchnorm
from system import distributed, errors, hardware
from utils import cli, pictures, resume
from utils.augment import augment, parse_policy, policy
from system.errors import Interrupted
from utils.log import Meter, balance
from utils.sampling import fixed_noise
from utils.training import Run, learning_rate

GRID = 64  # images in each sample grid, 8 x 8 (conditional: 8 of each class, a class per row)
CALIBRATION = 4  # batches of noise that set the drawn generator's BatchNorm statistics
# Per loss: learning rate, Adam betas, D steps per G step; WGAN-GP (Gulrajani et al. 2017, Alg. 1)
# also turns R1 off, since its gradient penalty already keeps D in check, and D's group
# statistic off, since the penalty needs each image's gradient to be its own.
LOSS_DEFAULTS = {"bce": dict(lr=2e-4, beta1=0.5, beta2=0.999, n_critic=1),
                 "hinge": dict(lr=2e-4, beta1=0.5, beta2=0.999, n_critic=1),
                 "wgan-gp": dict(lr=1e-4, beta1=0.0, beta2=0.9, n_critic=5, r1=0.0, d_norm="layer",
                             mbstd=0)}
# The settings of each recipe (those not typed on the command line). "paper" is the DCGAN of
# Radford et al. as pytorch/examples trains it. "small-data", the default, is the DCGAN for a
# training set of some 12,000 images: every image turned as the dataset allows ("dataset":
# data.SYMMETRIES), an EMA of G, lazy R1, a batch of 32, D without BatchNorm and D's group
# statistic, each measured against the run without it over 25 epochs (docs/studies.md).
RECIPES = {"paper": dict(batch_size=64, schedule="constant", ema=0.0, augment="none", lecam=0.0, r1=0.0, r1_every=1,
                         spectral_norm=False, d_norm="batch", g_labels="concat", mbstd=0),
           "small-data": dict(batch_size=32, schedule="constant", ema=0.99, augment="dataset", lecam=0.0, r1=0.1, r1_every=16,
                              spectral_norm=False, d_norm="none", g_labels="batchnorm", mbstd=4)}
# A conditional D, stronger for its projection term, overpowers G without LeCam, and its samples
# teach a classifier more with BatchNorm kept in D (docs/results.md, "The conditional DCGAN"),
# whose batch statistics already show D the spread of a batch; the group statistic is not
# measured there.
CONDITIONAL = {"paper": {}, "small-data": dict(lecam=0.01, d_norm="batch", mbstd=0)}
# What the second curves panel shows for each loss, and its reference line.
D_PANEL = {"bce": (["d_x", "d_g_z"], 0.5), "hinge": (["d_real", "d_fake"], 0.0),
           "wgan-gp": (["wasserstein", "gp"], None)}
# When D is out of balance with G (log.balance): the logged means of its scores of real and of
# generated images (probabilities for bce, logits for hinge), and the gaps between them below
# which it tells them apart no better than chance and above which it has overpowered G. A D
# without normalisation scores both near 0.5 and still teaches G (docs/datasets.md, "Quality at
# other sizes"), so "chance" is a gap of a few hundredths.
BALANCE = {"bce": ("d_x", "d_g_z", 0.02, 0.8), "hinge": ("d_real", "d_fake", 0.08, 3.0)}


def build_parser():
    p = cli.make_parser(__doc__)
    cli.add_common_args(p, "gan", epochs=25, lr=None, batch_size=None,  # the recipe's batch
                        lr_help="Adam learning rate (default: 2e-4; 1e-4 for wgan-gp)")
    cli.add_recipe_arg(p, RECIPES, CONDITIONAL, "small-data")
    p.add_argument("--loss", choices=LOSSES, default="bce",
                   help="bce: the DCGAN of the paper; wgan-gp: a critic with a gradient penalty; hinge")
    p.add_argument("--beta1", type=cli.unit_interval, default=None,
                   help="Adam beta1 (default: 0.5 as in Radford et al.; 0.0 for wgan-gp)")
    p.add_argument("--beta2", type=cli.unit_interval, default=None,
                   help="Adam beta2 (default: 0.999; 0.9 for wgan-gp)")
    p.add_argument("--n-critic", type=cli.positive_int, default=None, metavar="N",
                   help="D steps per G step (default: 1; 5 for wgan-gp)")
    p.add_argument("--gp-weight", type=cli.non_negative_float, default=10.0,
                   help="lambda of the WGAN-GP gradient penalty")
    p.add_argument("--ema", type=cli.unit_interval, default=None, metavar="DECAY",
                   help="decay of the exponential moving average of G used for grids, samples and "
                        "evaluation (the raw G is kept too); 0 turns it off")
    p.add_argument("--augment", type=policy, default=None, metavar="OPS",
                   help="differentiable augmentation of every image D sees, real and generated: any of "
                        "symmetry,flip,translation,color,cutout, or all, or none (default: the recipe's; "
                        "small-data turns images as the dataset allows, docs/datasets.md)")
    p.add_argument("--lecam", type=cli.non_negative_float, default=None, metavar="WEIGHT",
                   help="weight of LeCam regularisation of D (Tseng et al. 2021); 0 turns it off")
    p.add_argument("--r1", type=cli.non_negative_float, default=None, metavar="GAMMA",
                   help="gamma of the R1 penalty gamma/2 E||grad D(x)||^2 on real images (Mescheder et "
                        "al. 2018); 0 turns it off")
    p.add_argument("--r1-every", type=cli.positive_int, default=None, metavar="N",
                   help="compute R1 on every N-th batch only, weighted N times (lazy regularisation, Karras "
                        "et al. 2020): the same penalty on average at about 1/N of its cost")
    p.add_argument("--spectral-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="spectral normalisation of D's weights (Miyato et al. 2018)")
    p.add_argument("--d-norm", choices=D_NORMS, default=None,
                   help="what normalises D's hidden layers: BatchNorm over the batch (the DCGAN's), layer norm "
                        "per image, or none (WGAN-GP: layer by default, and never batch, which its penalty forbids)")
    p.add_argument("--mbstd", type=cli.non_negative_int, default=None, metavar="GROUP",
                   help="D's last layer also reads the spread of its features over each group of GROUP images "
                        "(minibatch standard deviation, Karras et al. 2018), so it can tell that G draws too few "
                        "kinds of image; 0 turns it off (default: 4; 0 with --conditional, --recipe paper "
                        "and --loss wgan-gp)")
    p.add_argument("--g-labels", choices=LABEL_INPUTS, default=None,
                   help="--conditional: G reads one-hot labels with z (concat), or through a class-conditional "
                        "BatchNorm in every layer (batchnorm)")
    p.add_argument("--class-loss", type=cli.non_negative_float, default=0.0, metavar="W",
                   help="--conditional: D also names the class of every real image (an auxiliary classifier, "
                        "Odena et al. 2017), and G's loss adds W times the cross-entropy of its images' asked-for "
                        "classes under it; 0 turns it off")
    p.add_argument("--latent-dim", "--nz", type=cli.positive_int, default=100, metavar="N",
                   help="size of the noise vector z (--nz, as pytorch/examples names it, is the same flag)")
    p.add_argument("--ngf", type=cli.positive_int, default=64, help="generator width")
    p.add_argument("--ndf", type=cli.positive_int, default=None,
                   help="discriminator width (default: 64; 128 for a D without normalisation at 28 pixels, whose "
                        "two stride-2 layers otherwise tell real from generated images no better than chance)")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun, take BatchNorm statistics over the global batch of all processes, "
                        "as one process would; without it each process normalises its own share "
                        "(--batch-size / processes images), a different and noisier model")
    return p


def fill_defaults(args) -> None:
    """Fill the settings whose defaults depend on --recipe, --conditional and --loss (those left at None)."""
    conditional = CONDITIONAL[args.recipe] if args.conditional else {}
    for key, value in {**RECIPES[args.recipe], **conditional, **LOSS_DEFAULTS[args.loss]}.items():
        if getattr(args, key) is None:
            setattr(args, key, Dataset(args.dataset, args.size).symmetries if value == "dataset" else value)
    if args.ndf is None:  # at 28 pixels D has 2 stride-2 layers (4 at 64): docs/datasets.md, "Quality at other sizes"
        args.ndf = 128 if args.size == 28 and args.d_norm == "none" else 64


class GANTrainer:
    """The networks, optimisers and precision of a run, and its step (shared with bench.py).

    One step sees one batch of real images: D always learns from it, G on every n_critic-th
    batch. Losses stay on the device in `meter`; nothing in a step waits for the device.
    """

    def __init__(self, args, networks: dict, device: torch.device):
        """networks: models/dcgan.py build()'s, by their checkpoint names."""
        self.args = args
        fmt = hardware.memory_format(args.channels_last)
        self.networks = {name: (convert_sync_batchnorm(m) if args.sync_bn else m).to(device, memory_format=fmt)
                         for name, m in networks.items()}
        self.G, self.D = self.networks["G"], self.networks["D"]
        self.G_ema = self.networks.get("G_ema")
        if self.G_ema is not None:
            self.G_ema.eval().requires_grad_(False)  # averaged, never trained
        self.lecam = self.networks.get("lecam")
        self.policy = parse_policy(args.augment)
        betas = (args.beta1, args.beta2)
        self.opt_g, self.opt_d = hardware.adam(self.G.parameters(), args.lr, betas), hardware.adam(self.D.parameters(), args.lr, betas)
        self.precision = hardware.Precision(args.precision, device)
        self.scaler_g, self.scaler_d = self.precision.scaler(), self.precision.scaler()
        # The step calls the networks through these (compiled with --compile). Under torchrun G
        # and D learn through DDP, which averages their gradients over the processes; G's step
        # runs D without DDP (D_judge), since D's weights get no gradient there and DDP would
        # wait for them. The gradient penalty and R1 differentiate D twice, which torch.compile
        # does not support.
        compile_d = args.compile and args.loss != "wgan-gp" and not args.r1
        self.G_learn = hardware.compiled(distributed.ddp(self.G, device), args.compile)
        self.D_learn = hardware.compiled(distributed.ddp(self.D, device), compile_d)
        self.D_judge = hardware.compiled(self.D, compile_d) if distributed.world_size() > 1 else self.D_learn
        self.g_params = list(self.G.parameters())
        # A D without BatchNorm judges each image on its own, so it may judge the real and the
        # generated images in one call: the same scores, for fewer and larger convolutions.
        self.one_call = args.d_norm != "batch"
        # Without --sync-bn each process's BatchNorm statistics come from its own share of the
        # batch; averaging them after every step keeps G, D and G's EMA identical everywhere.
        self.average_buffers = distributed.world_size() > 1 and not args.sync_bn
        # what grids, KID and sample.py draw from
        self.drawn = self.G_ema if self.G_ema is not None else self.G

    def state(self) -> tuple[dict, dict, dict]:
        """Networks, optimisers and scalers, as the checkpoint names them."""
        return self.networks, {"G": self.opt_g, "D": self.opt_d}, {"G": self.scaler_g, "D": self.scaler_d}

    def judge_both(self, real: torch.Tensor, fake: torch.Tensor, y: torch.Tensor | None):
        """D's logits for the real and the generated images (and, with --class-loss, the class
        it names for each real image). BatchNorm in D needs two calls: each batch is normalised
        by its own statistics, as in the DCGAN."""
        # the classifier learns from real images only: trained on G's images too, it could learn
        # to name G's own artefacts, and G to draw them
        with_names = self.args.class_loss > 0
        if self.one_call:
            out = self.D_learn(torch.cat([real, fake]), None if y is None else torch.cat([y, y]), named=with_names, sets=2)
            logits, names = out if with_names else (out, None)
            return *logits.chunk(2), None if names is None else names[:len(real)]
        out = self.D_learn(real, y, named=with_names)
        logits_real, names = out if with_names else (out, None)
        return logits_real, self.D_learn(fake, y), names

    def step(self, real: torch.Tensor, y: torch.Tensor | None, batch_index: int, meter: Meter) -> None:
        """batch_index counts batches from 1 over the whole run. D sees every image, real or
        generated, through --augment (each time with new random parameters)."""
        args = self.args
        g_step = batch_index % args.n_critic == 0  # G learns on every n_critic-th batch
        b = real.shape[0]  # this process's share of the batch
        with self.precision.autocast():
            with torch.set_grad_enabled(g_step):
                fake = self.G_learn(distributed.batch_noise(torch.randn, b, args.latent_dim, device=real.device), y)

            # (1) Update D on every batch: real images against generated ones of the same labels
            real, fake_seen = augment(real, self.policy), augment(fake.detach(), self.policy)
            logits_real, logits_fake, named = self.judge_both(real, fake_seen, y)
            loss_d = adversarial = discriminator_loss(args.loss, logits_real, logits_fake)
            if args.class_loss:
                loss_d = loss_d + F.cross_entropy(named.float(), y)
                meter.update(d_named=(named.argmax(1) == y).float().mean())
            if args.r1 and batch_index % args.r1_every == 0:
                r1 = r1_penalty(self.D, real, y)  # on the plain module, outside DDP, as the GP
                meter.update(r1=r1)
                loss_d = loss_d + args.r1 / 2 * args.r1_every * r1
            if self.lecam is not None:
                lecam = self.lecam(logits_real, logits_fake, distributed.batch_mean)
                meter.update(lecam=lecam)
                loss_d = loss_d + args.lecam * lecam
            if args.loss == "wgan-gp":
                mix = distributed.batch_noise(torch.rand, b, 1, 1, 1, device=real.device)
                gp = gradient_penalty(self.D, real, fake_seen, y, mix)
                meter.update(wasserstein=-adversarial, gp=gp)
                loss_d = loss_d + args.gp_weight * gp
            elif args.loss == "bce":
                meter.update(d_x=torch.sigmoid(logits_real.float()).mean(), d_g_z=torch.sigmoid(logits_fake.float()).mean())
            else:
                meter.update(d_real=logits_real.mean(), d_fake=logits_fake.mean())
        hardware.backward_step(loss_d, self.opt_d, self.scaler_d)
        meter.update(loss_d=loss_d)

        # (2) Update G: make D score the generated images as real (and, with --class-loss, name
        # them as the classes asked for). Only G's weights get gradients.
        if g_step:
            with self.precision.autocast():
                seen = augment(fake, self.policy)  # its own random parameters, not those of D's step
                if args.class_loss:
                    judged, named = self.D_judge(seen, y, named=True)
                    class_loss = F.cross_entropy(named.float(), y)
                    meter.update(class_loss=class_loss, fake_named=(named.argmax(1) == y).float().mean())
                    loss_g = generator_loss(args.loss, judged) + args.class_loss * class_loss
                else:
                    loss_g = generator_loss(args.loss, self.D_judge(seen, y))
            hardware.backward_step(loss_g, self.opt_g, self.scaler_g, inputs=self.g_params)
            meter.update(loss_g=loss_g)
        if self.average_buffers:
            distributed.average_buffers(self.G, self.D)
        if g_step and self.G_ema is not None:
            ema_update(self.G_ema, self.G, ema_decay(args.ema, batch_index // args.n_critic - 1))


    def recalibrate(self, calibration: list[tuple]) -> None:
        """Before drawing: the BatchNorm statistics of each generator that may be drawn (the EMA,
        and the raw G, which sample.py --no-ema draws) re-estimated on the fixed calibration noise."""
        generators = [self.G] + ([self.G_ema] if self.G_ema is not None else [])
        for generator in generators:
            recalibrate_batchnorm(generator, calibration)
        if self.average_buffers:
            distributed.average_buffers(*generators)


def calibration_batches(args, num_classes: int, device: torch.device) -> list[tuple]:
    """CALIBRATION batches of fixed noise (and balanced labels), the same every epoch, over which
    the drawn generator's BatchNorm statistics are re-estimated before it draws. Under torchrun
    each process takes its own share of each batch, as in training."""
    z = fixed_noise(CALIBRATION * args.batch_size, args.latent_dim, args.seed + 2, device).split(args.batch_size)
    y = balanced_labels(CALIBRATION * args.batch_size, num_classes, device).split(args.batch_size) if args.conditional else None
    return [(distributed.own_rows(z[i]), None if y is None else distributed.own_rows(y[i])) for i in range(CALIBRATION)]


def parse_args(argv=None) -> tuple[argparse.Namespace, dict | None]:
    """The run's settings: the flags typed, with --resume the run's own (from its checkpoint,
    returned too), and the recipe's and the loss's defaults for the rest."""
    args, ckpt = resume.settings(build_parser(), argv, "gan")
    fill_defaults(args)
    check_settings(args, Dataset(args.dataset, args.size))
    return args, ckpt


def check_settings(args, data) -> None:
    """Combinations of settings that cannot train on `data` (what medmnist.INFO says of it)."""
    if args.conditional and data.multi_label:
        raise errors.UserError(f"--conditional: {data.name} is multi-label ({data.num_classes} findings, "
                               "several per image), so there is no one class to condition on; train without it")
    if args.loss == "wgan-gp" and args.d_norm == "batch":
        raise errors.UserError("--d-norm batch mixes the images of a batch, which WGAN-GP's gradient penalty "
                               "forbids (it needs each image's own gradient); use --d-norm layer or none")
    if args.loss == "wgan-gp" and args.mbstd:
        raise errors.UserError(f"--mbstd {args.mbstd} mixes the images of a group, which WGAN-GP's gradient penalty "
                               "forbids (it needs each image's own gradient); use --mbstd 0")
    if args.class_loss and not args.conditional:
        raise errors.UserError("--class-loss asks G for the class of each image, which only a --conditional run "
                               "has; add --conditional or drop --class-loss")
    data.check_augmentation(parse_policy(args.augment))


def main(argv=None):
    args, ckpt = parse_args(argv)
    run = Run(args, "gan", ckpt, VALUE_RANGE)
    steps = args.epochs * len(run.batches)
    if args.n_critic > steps:  # the one setting checked against the data file's size
        raise errors.UserError(f"--n-critic {args.n_critic} is more than the run's {steps} steps, so G would "
                               "never learn; lower --n-critic or train longer")
    device, out, classes = run.device, run.out, run.data.num_classes
    trainer = GANTrainer(args, run.networks(), device)
    probe = KIDProbe(args, run.data, args.latent_dim, device) if args.eval_every and distributed.is_main() else None
    run.start(*trainer.state())
    G, D, drawn = trainer.G, trainer.D, trainer.drawn
    grid_y = grid_labels(classes, GRID // 8, device) if args.conditional else None
    grid_z = fixed_noise(GRID if grid_y is None else len(grid_y), args.latent_dim, args.seed, device)
    calibration = calibration_batches(args, classes, device)
    said = None  # the balance of D and G the run last reported
    print(f"GAN on {run.data} ({args.recipe} recipe, {args.loss}{', conditional' if args.conditional else ''}): G "
          f"{sum(p.numel() for p in G.parameters()):,} and D {sum(p.numel() for p in D.parameters()):,} "
          f"parameters; {len(run.batches.labels):,} training images, {len(run.batches)} steps per epoch on "
          f"{device}{distributed.processes_note(args.batch_size)}, {trainer.precision.name}")

    try:
        for epoch in run.epochs():
            G.train(), D.train()
            for index, (real, y) in run.steps(epoch):
                lr = learning_rate(args.lr, args.schedule, index, steps)
                for opt in (trainer.opt_g, trainer.opt_d):
                    opt.param_groups[0]["lr"] = lr
                trainer.step(real, y if args.conditional else None, index, run.meter)

            # End of epoch: BatchNorm statistics of the generators that draw, metrics (and KID), a
            # sample grid from the fixed noise, curves. Rank 0 alone evaluates, logs and draws.
            trainer.recalibrate(calibration)
            record = {**run.epoch_record(epoch), "seconds": run.seconds()}
            if distributed.is_main():
                drawn.eval()
                if probe is not None and probe.due(epoch + 1):
                    record.update(probe(drawn))
                verdict = balance([*run.log.records, record], *BALANCE[args.loss]) if args.loss in BALANCE else None
                state, line = verdict or (None, None)
                if state is not None:
                    record["balance"] = state
                if state != said:  # said once when it starts, and again if it changes
                    tqdm.write(f"warning: {line}" if line else "D and G are in balance again")
                    said = state
                run.log.write(record)
                with torch.no_grad():
                    pictures.save_grid(drawn.generate(grid_z, grid_y), out / f"samples_epoch_{epoch + 1:03d}.png",
                                       row_labels=run.data.class_names if args.conditional else None)
                keys, line = D_PANEL[args.loss]
                pictures.plot_curves(run.log.records, out / "curves.png", [
                    ("losses", ["loss_d", "loss_g"], None), ("discriminator", keys, line),
                    ("penalties", ["r1", "lecam"], None),
                    ("D's classes right (--class-loss)", ["d_named", "fake_named"], None), *PANELS])
            run.save(epoch + 1)
    except Interrupted as stop:  # Ctrl-C: the run so far, to continue with --resume
        run.save(stop.epoch, stop.step)
        raise
    print(f"Done: {args.epochs} epochs in {out}/ (samples_epoch_{args.epochs:03d}.png, curves.png, ckpt.pt)")


if __name__ == "__main__":
    cli.run_main(main)
