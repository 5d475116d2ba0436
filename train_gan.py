"""Train a DCGAN on BloodMNIST-64.

    python train_gan.py                                   # 25 epochs, writes outputs/gan/
    python train_gan.py --data-root ../my_data --epochs 5 --out outputs/gan_quick
    python train_gan.py --resume                          # continue outputs/gan/ after Ctrl-C

Every epoch writes samples_epoch_NNN.png (the same fixed noise each time, so epochs compare),
metrics.jsonl, curves.png and ckpt.pt into --out.
"""
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
from data import Batches, load_bloodmnist
from models.dcgan import Discriminator, Generator

VALUE_RANGE = (-1.0, 1.0)  # the generator ends in Tanh
GRID = 64  # images in each sample grid, 8 x 8


def build_parser():
    p = utils.make_parser(__doc__)
    utils.add_common_args(p, out="outputs/gan", epochs=25, lr=2e-4)
    p.add_argument("--beta1", type=utils.unit_interval, default=0.5, help="Adam beta1 (0.5 as in Radford et al.)")
    p.add_argument("--beta2", type=utils.unit_interval, default=0.999, help="Adam beta2")
    p.add_argument("--nz", type=utils.positive_int, default=100, help="size of the noise vector z")
    p.add_argument("--ngf", type=utils.positive_int, default=64, help="generator width")
    p.add_argument("--ndf", type=utils.positive_int, default=64, help="discriminator width")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    ckpt = utils.start_run(args, parser, kind="gan")
    out = Path(args.out)
    ckpt_path = out / "ckpt.pt"
    device = utils.pick_device(args.device)
    utils.set_seed(args.seed)

    splits = load_bloodmnist(args.data_root, splits=("train",), subset=args.subset)
    batches = Batches(splits["train"], args.batch_size, device, VALUE_RANGE, seed=args.seed)

    G = Generator(args.nz, args.ngf).to(device)
    D = Discriminator(args.ndf).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
    noise = utils.fixed_noise(GRID, args.nz, args.seed, device)
    meter = utils.Meter()
    epoch, step = 0, 0
    if ckpt is not None:
        G.load_state_dict(ckpt["models"]["G"])
        D.load_state_dict(ckpt["models"]["D"])
        opt_g.load_state_dict(ckpt["optimizers"]["G"])
        opt_d.load_state_dict(ckpt["optimizers"]["D"])
        meter.load_state_dict(ckpt["meter"], device)
        utils.set_rng_state(ckpt["rng"], device)
        epoch, step = ckpt["epoch"], ckpt["step"]
    log = utils.MetricsLog(out / "metrics.jsonl", keep_epochs=epoch)
    print(f"DCGAN: G {sum(p.numel() for p in G.parameters()):,} and D "
          f"{sum(p.numel() for p in D.parameters()):,} parameters; {len(batches.labels):,} "
          f"training images, {len(batches)} steps per epoch on {device}")

    def checkpoint(epoch: int, step: int) -> None:
        utils.save_checkpoint(ckpt_path, {
            "kind": "gan", "args": vars(args), "epoch": epoch, "step": step,
            "models": {"G": G.state_dict(), "D": D.state_dict()},
            "optimizers": {"G": opt_g.state_dict(), "D": opt_d.state_dict()},
            "meter": meter.state_dict(), "rng": utils.rng_state(device)})

    with utils.GracefulStop() as stop:
        for epoch in range(epoch, args.epochs):
            t0 = time.time()
            G.train(), D.train()
            bar = tqdm(batches.epoch(epoch, start=step), total=len(batches), initial=step,
                       desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True)
            for step, (real, _) in enumerate(bar, start=step + 1):
                b = real.shape[0]
                ones, zeros = torch.ones(b, device=device), torch.zeros(b, device=device)
                fake = G(torch.randn(b, args.nz, device=device))

                # (1) Update D: maximise log D(x) + log(1 - D(G(z)))
                logits_real, logits_fake = D(real), D(fake.detach())
                loss_d = (F.binary_cross_entropy_with_logits(logits_real, ones)
                          + F.binary_cross_entropy_with_logits(logits_fake, zeros))
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()

                # (2) Update G: maximise log D(G(z)), the non-saturating loss
                logits_gen = D(fake)
                loss_g = F.binary_cross_entropy_with_logits(logits_gen, ones)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()

                meter.update(loss_d=loss_d, loss_g=loss_g, d_x=torch.sigmoid(logits_real).mean(),
                             d_g_z=torch.sigmoid(logits_fake).mean())
                if step % 10 == 0 or step == len(batches):  # reading the means syncs the device
                    means = meter.means()
                    utils.check_finite(means, epoch, step, ckpt_path)
                    bar.set_postfix(utils.format_stats(means))
                if stop.requested:
                    bar.close()
                    checkpoint(epoch, step)
                    utils.stop_and_exit(ckpt_path, epoch, step)
            bar.close()

            # End of epoch: metrics, a sample grid from the fixed noise, curves, checkpoint
            means = meter.means()
            utils.check_finite(means, epoch, step, ckpt_path)
            log.write({"epoch": epoch + 1, **means, "seconds": round(time.time() - t0, 2)})
            meter, step = utils.Meter(), 0
            G.eval()
            with torch.no_grad():
                utils.save_grid(G(noise) * 0.5 + 0.5, out / f"samples_epoch_{epoch + 1:03d}.png")
            utils.plot_curves(log.records, out / "curves.png", [
                ("losses", ["loss_d", "loss_g"], None),
                ("discriminator outputs", ["d_x", "d_g_z"], 0.5)])
            checkpoint(epoch + 1, 0)
    print(f"Done: {args.epochs} epochs in {out}/ (samples_epoch_{args.epochs:03d}.png, curves.png, ckpt.pt)")


if __name__ == "__main__":
    utils.run_main(main)
