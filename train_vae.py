"""Train a convolutional VAE (or a class-conditional one) on BloodMNIST-64, or on any MedMNIST
2D dataset at any of its sizes.

    python train_vae.py                                   # a VAE-GAN, 25 epochs, writes outputs/vae/
    python train_vae.py --conditional --out outputs/cvae  # decoder and encoder see the cell type
    python train_vae.py --recipe plain --out outputs/vae_plain  # the VAE alone, no discriminator
    python train_vae.py --recipe textbook --out outputs/vae_textbook  # as pytorch/examples trains it
    python train_vae.py --data-root ../my_data --epochs 5 --out outputs/vae_quick
    python train_vae.py --resume                          # continue outputs/vae/ after Ctrl-C
    python train_vae.py --dataset pathmnist --size 28     # colon pathology: outputs/vae_pathmnist_28/
    torchrun --standalone --nproc_per_node 4 train_vae.py # 4 GPUs, global batch 16

Every epoch writes samples_epoch_NNN.png (decoded from the same draws of the fitted density of
each class, one class per row),
recon_epoch_NNN.png (validation images over their reconstructions), metrics.jsonl with the
validation ELBO and PSNR, curves.png and ckpt.pt into --out.
"""
import argparse

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import Batches, Dataset, grid_labels, to_float
from evaluation.probe import PANELS, KIDProbe
from evaluation.reconstruction import evaluate
from models import vae
from models.dcgan import discriminator_loss, generator_loss
from models.vae import LIKELIHOODS, VALUE_RANGE
from system import distributed, errors, hardware
from utils import cli, pictures, resume
from utils.augment import augment, parse_policy
from system.errors import Interrupted
from utils.log import Meter
from utils.sampling import fixed_noise
from utils.training import Run, learning_rate

GRID = 64  # prior samples in each grid, 8 x 8 (by class: 8 of each, a class per row)
CURVES = [("training loss, validation -ELBO (nats)", ["loss", "val_nelbo"], None),
          ("reconstruction (nats)", ["recon", "val_recon"], None),
          ("KL (nats)", ["kl", "val_kl"], None),
          ("validation PSNR (dB)", ["val_psnr"], None),
          ("patch discriminator (--adversarial)", ["d_x", "d_recon"], None),
          ("D's classes right (--class-loss)", ["d_named", "recon_named"], None),
          *PANELS]
RECON = 32  # validation images in each reconstruction grid, each row over its reconstruction
# The settings of each recipe (those not typed on the command line). "textbook" is the VAE of
# pytorch/examples (Kingma & Welling's Bernoulli likelihood, batch 128, constant rate) on this
# repo's encoder and decoder. "plain" is the VAE alone with the calibrated Gaussian likelihood and
# the 8 symmetries of the square. "vae-gan", the default, adds a patch discriminator that judges
# and names the reconstructions, a cosine schedule, resize upsampling and a residual block per
# resolution: it samples far better than "plain" at 3.5 to 4 times its time per epoch
# (docs/results.md, "The VAE-GAN" and "The default recipe").
RECIPES = {"textbook": dict(batch_size=128, likelihood="bernoulli", augment="none", schedule="constant",
                            upsample="transposed", res_blocks=0, adversarial=0.0, class_loss=0.0, critic_blur=False),
           "plain": dict(batch_size=32, likelihood="gaussian", augment="dataset", schedule="constant",
                         upsample="transposed", res_blocks=0, adversarial=0.0, class_loss=0.0, critic_blur=False),
           "vae-gan": dict(batch_size=16, likelihood="gaussian", augment="dataset", schedule="cosine",
                           upsample="resize", res_blocks=1, adversarial=0.0003, class_loss=0.001,
                           critic_blur=False)}
# A conditional VAE-GAN draws the class asked for more often with a stronger adversarial term
# (docs/results.md, "D names the class")
CONDITIONAL = {"textbook": {}, "plain": {}, "vae-gan": dict(adversarial=0.001)}


def widths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(w) for w in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive channel counts such as 32,64; got {text!r}")
    return values


def build_parser():
    p = cli.make_parser(__doc__)
    cli.add_common_args(p, "vae", epochs=25, lr=1e-3, batch_size=None)  # the recipe's batch
    cli.add_recipe_arg(p, RECIPES, CONDITIONAL, "vae-gan")
    p.add_argument("--latent-dim", type=cli.positive_int, default=128, metavar="N", help="size of z")
    p.add_argument("--widths", type=widths, default="32,64", metavar="C1,C2,...",
                   help="channels of the encoder's stride-2 convolutions, mirrored by the decoder")
    p.add_argument("--likelihood", choices=LIKELIHOODS, default=None,
                   help="p(x|z): Gaussian with the batch's best variance (sharper reconstructions), "
                        "or Bernoulli per pixel as in Kingma & Welling")
    p.add_argument("--beta", type=cli.non_negative_float, default=1.0, help="weight of the KL term (1 = the ELBO)")
    p.add_argument("--augment", choices=["symmetry", "flip", "none"], default=None,
                   help="show every training image (input and target alike) in one of the 8 rotations and "
                        "flips of the square, or mirrored left to right half the time, drawn at random each "
                        "time (utils/augment.py), or as it is (default: the recipe's; plain and vae-gan turn "
                        "images as the dataset allows, docs/datasets.md)")
    p.add_argument("--res-blocks", type=cli.non_negative_int, default=None, metavar="N",
                   help="residual blocks (two 3x3 convolutions) at each resolution of the decoder")
    p.add_argument("--upsample", choices=vae.UPSAMPLES, default=None,
                   help="how the decoder doubles its resolution: a 4x4 stride-2 transposed convolution (the "
                        "classic VAE), or nearest-neighbour resizing then a 3x3 convolution, which draws no "
                        "period-2 grid (docs/models.md)")
    p.add_argument("--adversarial", type=cli.non_negative_float, default=None, metavar="W",
                   help="a VAE-GAN: a patch discriminator judges the reconstructions, and the VAE is also "
                        "trained to pass them off as real, counted as W squared error on every pixel "
                        "(docs/models.md; Gaussian likelihood only, so 0 when --likelihood bernoulli is typed; "
                        "0 = off)")
    p.add_argument("--critic-labels", action=argparse.BooleanOptionalAction, default=None,
                   help="--adversarial: the patch discriminator also reads each image's class (a projection "
                        "term), so it judges a reconstruction as a cell of its type; conditional or not, the "
                        "training labels are known. Default: on for a single-label set (the better FID, "
                        "docs/results.md), off for a multi-label one")
    p.add_argument("--critic-blur", action=argparse.BooleanOptionalAction, default=None,
                   help="--adversarial: the patch discriminator low-passes the input of each stride-2 layer "
                        "(a binomial filter), so a regular pattern finer than its stride cannot pass for real "
                        "texture (default: the recipe's)")
    p.add_argument("--class-loss", type=cli.non_negative_float, default=None, metavar="W",
                   help="--adversarial: the patch discriminator also learns to name each real image's class (an "
                        "auxiliary classifier, Odena et al. 2017), and the VAE is trained to have its "
                        "reconstructions named as their class, counted as W squared error on every pixel per nat "
                        "of cross-entropy (docs/models.md; single-label sets, so 0 on a multi-label one unless "
                        "typed; 0 = off)")
    p.add_argument("--class-prior", action=argparse.BooleanOptionalAction, default=True,
                   help="--conditional: learn a Gaussian prior p(z | y) per class, so that z carries the "
                        "class it is drawn for; --no-class-prior: N(0, I) for every class")
    return p


class VAETrainer:
    """The model, optimiser and precision of a run, and its step (shared with bench.py); with
    --adversarial also the patch discriminator, its optimiser and its step."""

    def __init__(self, args, networks: dict, device: torch.device):
        """networks: models/vae.py build()'s, by their checkpoint names."""
        self.args = args
        fmt = hardware.memory_format(args.channels_last)
        self.model = networks["vae"].to(device, memory_format=fmt)
        self.opt = hardware.adam(self.model.parameters(), args.lr)
        self.precision = hardware.Precision(args.precision, device)
        self.scaler = self.precision.scaler()
        self.net = hardware.compiled(distributed.ddp(self.model, device), args.compile)  # DDP under torchrun
        self.policy = parse_policy(args.augment)
        self.D = self.backward_inputs = None  # with a D, the VAE's backward pass leaves D's weights alone
        if "critic" in networks:  # the DCGAN's Adam
            self.D = networks["critic"].to(device, memory_format=fmt)
            self.opt_d = hardware.adam(self.D.parameters(), 2e-4, (0.5, 0.999))
            self.scaler_d = self.precision.scaler()
            # D learns through DDP; the VAE's step runs it plain, as train_gan.py's G step does
            self.D_learn = hardware.compiled(distributed.ddp(self.D, device), args.compile)
            self.D_judge = hardware.compiled(self.D, args.compile) if distributed.world_size() > 1 else self.D_learn
            self.backward_inputs = list(self.model.parameters())

    def state(self) -> tuple[dict, dict, dict]:
        """Models, optimisers and scalers, as the checkpoint names them."""
        if self.D is None:
            return {"vae": self.model}, {"vae": self.opt}, {"vae": self.scaler}
        return ({"vae": self.model, "critic": self.D}, {"vae": self.opt, "critic": self.opt_d},
                {"vae": self.scaler, "critic": self.scaler_d})

    def step(self, x: torch.Tensor, labels: torch.Tensor | None, meter: Meter) -> None:
        """x is this process's share of the batch, labels its classes (the condition of a
        conditional model, and what a --critic-labels D reads); the augmentation's draws, the
        posterior noise and the Gaussian likelihood's variance are those of the global batch."""
        y = labels if self.args.conditional else None
        classes = labels if self.args.critic_labels else None
        x = augment(x, self.policy)  # turned as the dataset allows: new training images, not noise
        eps = distributed.batch_noise(torch.randn, x.shape[0], self.model.latent_dim, device=x.device)
        with self.precision.autocast():
            logits, mu, logvar = self.net(x, y, eps)
        critic = None
        if self.D is not None:  # D's step first, then the VAE is judged by the updated D
            recon = torch.sigmoid(logits)
            self.critic_step(x, recon.detach(), labels, meter)
            with self.precision.autocast():
                patches, named = self.judged(self.D_judge, recon, classes)
            # -log D(x_hat), the non-saturating loss of the reconstructions
            critic = {"adversarial": (generator_loss("bce", patches), self.args.adversarial)}
            if named is not None:  # -log p(y | x_hat) under D's classifier
                critic["class_loss"] = (F.cross_entropy(named.float(), labels), self.args.class_loss)
                meter.update(recon_named=(named.argmax(1) == labels).float().mean())
        with self.precision.autocast():
            parts = self.model.loss(x, logits, mu, logvar, y, beta=self.args.beta, batch_mean=distributed.batch_mean,
                                    critic=critic)
        hardware.backward_step(parts["loss"], self.opt, self.scaler, inputs=self.backward_inputs)
        meter.update(**parts)

    def judged(self, D, x: torch.Tensor, classes: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """D's patch logits of x, and its class logits (None without --class-loss)."""
        return D(x, classes, named=True) if self.args.class_loss else (D(x, classes), None)

    def critic_step(self, x: torch.Tensor, recon: torch.Tensor, labels: torch.Tensor, meter: Meter) -> None:
        """One step of the patch discriminator: every patch of x real, every patch of recon (of
        the same classes) not; with --class-loss its classifier also learns the classes of x."""
        classes = labels.repeat(2) if self.args.critic_labels else None
        with self.precision.autocast():
            patches, named = self.judged(self.D_learn, torch.cat([x, recon]), classes)
        real, fake = patches[:len(x)].float(), patches[len(x):].float()
        loss_d = discriminator_loss("bce", real, fake)  # -log D(x) - log(1 - D(x_hat)), per patch
        if named is not None:
            # real images only: taught the reconstructions' classes too (as in AC-GAN), the
            # classifier could learn to name the VAE's own artefacts, and the VAE to draw them
            named = named[:len(x)].float()
            loss_d = loss_d + F.cross_entropy(named, labels)
            meter.update(d_named=(named.argmax(1) == labels).float().mean())
        hardware.backward_step(loss_d, self.opt_d, self.scaler_d)
        meter.update(loss_d=loss_d, d_x=torch.sigmoid(real).mean(), d_recon=torch.sigmoid(fake).mean())


def fill_defaults(args) -> None:
    """Fill the settings left unset (None) from --recipe and --conditional. The recipe's
    discriminator needs what it is built on: it is off with a typed Bernoulli likelihood, and its
    class loss is off without it or on a multi-label set; --critic-labels is on wherever there is a
    discriminator and one class per image."""
    recipe = {**RECIPES[args.recipe], **(CONDITIONAL[args.recipe] if args.conditional else {})}
    data = Dataset(args.dataset, args.size)
    if recipe["augment"] == "dataset":  # the symmetries this dataset's images have
        recipe["augment"] = data.symmetries
    multi_label = data.multi_label

    def fill(key: str, value) -> None:
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("batch_size", "likelihood", "augment", "schedule", "upsample", "res_blocks", "critic_blur"):
        fill(key, recipe[key])
    fill("adversarial", recipe["adversarial"] if args.likelihood == "gaussian" else 0.0)
    fill("class_loss", recipe["class_loss"] if args.adversarial and not multi_label else 0.0)
    fill("critic_labels", bool(args.adversarial) and not multi_label)


def parse_args(argv=None) -> tuple[argparse.Namespace, dict | None]:
    """The run's settings: the flags typed, with --resume the run's own (from its checkpoint,
    returned too), and the recipe's defaults for the rest."""
    args, ckpt = resume.settings(build_parser(), argv, "vae")
    fill_defaults(args)
    check_settings(args, Dataset(args.dataset, args.size))
    return args, ckpt


def check_settings(args, data) -> None:
    """Combinations of settings that cannot train on `data` (what medmnist.INFO says of it)."""
    if args.conditional and data.multi_label:
        raise errors.UserError(f"--conditional: {data.name} is multi-label ({data.num_classes} findings, "
                               "several per image), so there is no one class to condition on; train without it")
    if args.class_loss and not args.adversarial:
        raise errors.UserError("--class-loss trains a classifier head of the patch discriminator; add --adversarial W "
                               "(0.001 measured best) or drop --class-loss")
    if args.class_loss and data.multi_label:
        raise errors.UserError(f"--class-loss: {data.name} is multi-label, so an image has no one class to be named "
                               "by; drop --class-loss")
    if args.critic_labels and data.multi_label:
        raise errors.UserError(f"--critic-labels: {data.name} is multi-label, so an image has no one class for "
                               "the discriminator to read; drop --critic-labels")
    if args.adversarial and args.likelihood != "gaussian":
        raise errors.UserError(f"--adversarial is weighed by the Gaussian likelihood's variance; drop "
                               f"--likelihood {args.likelihood} or --adversarial")
    data.check_augmentation(parse_policy(args.augment))
    if data.size % 2 ** len(args.widths):
        most = max(n for n in range(len(args.widths)) if data.size % 2 ** n == 0)
        raise errors.UserError(f"--widths {','.join(map(str, args.widths))}: {len(args.widths)} stride-2 "
                               f"layers do not divide {data.size} pixels evenly; use at most {most} widths")


@torch.no_grad()
def fit_prior(model: vae.VAE, batches: Batches, chunk: int = 500) -> None:
    """Fit the VAE's sampling densities to the encoder means and labels of the training split
    (read in order from the batches' own copy of it)."""
    model.eval()
    mu = []
    for i in range(0, len(batches.labels), chunk):
        x, y = to_float(batches.images[i:i + chunk], VALUE_RANGE), batches.labels[i:i + chunk]
        mu.append(model.encode(x, y if model.num_classes else None)[0])
    model.fit_prior(torch.cat(mu), batches.labels)


def main(argv=None):
    args, ckpt = parse_args(argv)
    run = Run(args, "vae", ckpt, VALUE_RANGE, splits=("train", "val"))
    device, out, batches = run.device, run.out, run.batches
    val = Batches(run.splits["val"], 256, device, VALUE_RANGE, shuffle=False,
                  channels_last=args.channels_last) if len(run.splits["val"]) else None
    if val is None:
        errors.warn("the data file has no validation images; the validation ELBO is not logged")
    trainer = VAETrainer(args, run.networks(), device)
    probe = KIDProbe(args, run.data, args.latent_dim, device) if args.eval_every and distributed.is_main() else None
    run.start(*trainer.state())
    model, opt = trainer.model, trainer.opt
    # a class per row, of the mixture or the condition
    grid_y = grid_labels(model.mixture, GRID // 8, device) if model.mixture else None
    grid_z = fixed_noise(GRID if grid_y is None else len(grid_y), args.latent_dim, args.seed, device)
    # the images of every reconstruction grid: rows of nrow validation images
    recon_images, recon_labels = next(iter((val if val is not None else batches).epoch(0)))
    nrow = min(8, len(recon_images))
    keep = min(RECON, len(recon_images) - len(recon_images) % nrow)
    recon_images, recon_labels = recon_images[:keep], recon_labels[:keep] if args.conditional else None
    print(f"VAE on {run.data}: {sum(p.numel() for p in model.parameters()):,} parameters; {len(batches.labels):,} "
          f"training images, {len(batches)} steps per epoch on {device}{distributed.processes_note(args.batch_size)}, "
          f"{trainer.precision.name}")

    try:
        for epoch in run.epochs():
            model.train()
            for index, (x, y) in run.steps(epoch):
                opt.param_groups[0]["lr"] = learning_rate(args.lr, args.schedule, index, args.epochs * len(batches))
                trainer.step(x, y, run.meter)

            # End of epoch: sampling densities, validation ELBO, samples, reconstructions, curves.
            # Rank 0 alone fits, evaluates and draws; the other processes never sample.
            record = run.epoch_record(epoch)
            if distributed.is_main():
                fit_prior(model, batches)
                if val is not None:
                    record.update(evaluate(model, val, args.seed))
                model.eval()
                if probe is not None and probe.due(epoch + 1):
                    record.update(probe(model))
                record["seconds"] = run.seconds()
                run.log.write(record)
                tqdm.write("  ".join(f"{k} {v:.4g}" for k, v in record.items() if not isinstance(v, list)))
                with torch.no_grad():
                    pictures.save_grid(model.generate(grid_z, grid_y), out / f"samples_epoch_{epoch + 1:03d}.png",
                                       row_labels=run.data.class_names if model.mixture else None)
                    # rows of originals, each over its row of mean reconstructions
                    recon = model.decode(model.encode(recon_images, recon_labels)[0], recon_labels)
                    pairs = torch.stack([recon_images.unflatten(0, (-1, nrow)), recon.unflatten(0, (-1, nrow))], 1)
                    pictures.save_grid(pairs.flatten(0, 2), out / f"recon_epoch_{epoch + 1:03d}.png", nrow)
                pictures.plot_curves(run.log.records, out / "curves.png", CURVES)
            run.save(epoch + 1)
    except Interrupted as stop:  # Ctrl-C: the run so far, to continue with --resume
        run.save(stop.epoch, stop.step)
        raise
    print(f"Done: {args.epochs} epochs in {out}/ (samples_epoch_{args.epochs:03d}.png, "
          f"recon_epoch_{args.epochs:03d}.png, curves.png, ckpt.pt)")


if __name__ == "__main__":
    cli.run_main(main)
