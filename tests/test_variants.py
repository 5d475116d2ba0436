"""The variants of the training scripts: GAN losses and the gradient penalty against hand
computations, a critic that keeps samples independent, class conditioning, generator EMA
arithmetic, and exact resume with all of them switched on."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import checkpoint, log
import train_gan
import train_vae
from models import dcgan
from data import Dataset
from conftest import TINY_GAN, TINY_VAE, states_equal, straight_and_resumed, vae_args
from models.dcgan import Discriminator, Generator, discriminator_loss, generator_loss, gradient_penalty
from models.vae import VAE


class LinearCritic(nn.Module):
    """D(x) = <w, x>: its gradient is w everywhere, so the penalty is (||w|| - 1)^2."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)


class SquareCritic(nn.Module):
    """D(x) = ||x||^2 / 2: its gradient at x is x itself."""

    def forward(self, x):
        return 0.5 * x.flatten(1).pow(2).sum(1)


def test_gradient_penalty_of_a_linear_critic():
    torch.manual_seed(0)
    w = torch.randn(3, 4, 4)
    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    gp = gradient_penalty(LinearCritic(w), real, fake)
    torch.testing.assert_close(gp, (w.norm() - 1) ** 2)
    critic = LinearCritic(w / w.norm())  # a unit gradient: no penalty
    assert gradient_penalty(critic, real, fake).item() == pytest.approx(0, abs=1e-10)


def test_gradient_penalty_is_taken_at_the_interpolates():
    torch.manual_seed(0)
    real, fake = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    torch.manual_seed(1)
    gp = gradient_penalty(SquareCritic(), real, fake)
    torch.manual_seed(1)
    e = torch.rand(6, 1, 1, 1)  # the same draw gradient_penalty makes
    x_hat = e * real + (1 - e) * fake
    torch.testing.assert_close(gp, ((x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean())


def test_gradient_penalty_trains_the_critic():
    critic = LinearCritic(torch.full((3, 4, 4), 2.0))
    real, fake = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    gradient_penalty(critic, real, fake).backward()  # create_graph: the penalty reaches the weights
    assert critic.w.grad is not None and critic.w.grad.abs().sum() > 0


def test_losses_match_their_definitions():
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.2, 1.5])
    bce = (F.binary_cross_entropy_with_logits(real, torch.ones(3))
           + F.binary_cross_entropy_with_logits(fake, torch.zeros(3)))
    torch.testing.assert_close(discriminator_loss("bce", real, fake), bce)
    torch.testing.assert_close(generator_loss("bce", fake), F.binary_cross_entropy_with_logits(fake, torch.ones(3)))
    hinge = (0 + 2 + 0.5) / 3 + (0 + 1.2 + 2.5) / 3
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(hinge)
    assert discriminator_loss("wgan-gp", real, fake).item() == pytest.approx(fake.mean() - real.mean())
    assert generator_loss("wgan-gp", fake).item() == pytest.approx(-fake.mean())


def test_critic_without_batchnorm_keeps_samples_independent():
    torch.manual_seed(0)
    critic = Discriminator(ndf=8, norm="layer").train()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in critic.modules())
    x = torch.randn(4, 3, 64, 64)
    alone = critic(x[:1])
    together = critic(torch.cat([x[:1], 10 * x[1:]]))[:1]
    torch.testing.assert_close(alone, together)  # other samples do not change sample 0's score


def test_conditional_models_use_the_label():
    torch.manual_seed(0)
    G, D = Generator(nz=16, ngf=8, num_classes=8), Discriminator(ndf=8, num_classes=8)
    z = torch.randn(4, 16)
    a, b = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])
    assert G(z, a).shape == (4, 3, 64, 64) and not torch.allclose(G(z, a), G(z, b))
    x = torch.randn(4, 3, 64, 64)
    D.embed.weight.data.normal_(0, 1)
    assert D(x, a).shape == (4,) and not torch.allclose(D(x, a), D(x, b))
    vae = VAE(latent_dim=8, widths=(8, 16), num_classes=8)
    logits, mu, logvar = vae(torch.rand(4, 3, 64, 64), a)
    assert logits.shape == (4, 3, 64, 64) and mu.shape == (4, 8)
    assert not torch.allclose(vae.decode(mu, a), vae.decode(mu, b))


def test_ema_arithmetic_includes_batchnorm_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    for net, value in ((model, 1.0), (ema, 0.0)):
        for t in net.state_dict().values():
            t.fill_(value)
    model[1].num_batches_tracked.fill_(7)
    dcgan.ema_update(ema, model, decay=0.9)
    for name, t in ema.state_dict().items():
        expected = 7 if name.endswith("num_batches_tracked") else 0.1  # 0.9 * 0 + 0.1 * 1
        torch.testing.assert_close(t.double(), torch.full_like(t, expected, dtype=torch.double), msg=name)
    dcgan.ema_update(ema, model, decay=0.9)
    torch.testing.assert_close(ema[0].weight, torch.full((2, 2), 0.19))  # 0.9 * 0.1 + 0.1 * 1


def test_ema_decay_warms_up():
    assert dcgan.ema_decay(0.999, 0) == pytest.approx(0.1)
    assert dcgan.ema_decay(0.999, 90) == pytest.approx(0.91)
    assert dcgan.ema_decay(0.999, 10**6) == 0.999


def test_wgan_gp_run_uses_its_defaults_and_logs_its_estimates(data_root, tmp_path):
    out = tmp_path / "wgan"
    train_gan.main(["--data-root", str(data_root), "--device", "cpu", "--epochs", "2", "--out", str(out),
                    "--loss", "wgan-gp", *TINY_GAN])
    config = json.loads((out / "config.json").read_text())
    assert (config["lr"], config["beta1"], config["beta2"], config["n_critic"]) == (1e-4, 0.0, 0.9, 5)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"wasserstein", "gp", "loss_d"} <= records[0].keys() and "loss_g" not in records[0]
    assert "loss_g" in records[1]  # the first G step is the 5th batch, in epoch 2
    ckpt = checkpoint.load_checkpoint(out / "ckpt.pt", "gan")
    assert not any("running_mean" in k for k in ckpt["models"]["D"])  # no BatchNorm in the critic
    # 8 batches over 2 epochs, G on every 5th: Adam's step count in G's optimiser says 1
    assert ckpt["optimizers"]["G"]["state"][0]["step"].item() == 1
    assert ckpt["optimizers"]["D"]["state"][0]["step"].item() == 8


@pytest.mark.parametrize("kind,extra", [
    ("gan", ["--conditional", "--ema", "0.9", "--loss", "wgan-gp", "--n-critic", "2"]),
    ("gan", ["--conditional", "--ema", "0.99", "--loss", "hinge"]),
    ("vae", ["--conditional"]),
])
def test_resume_is_exact_with_conditioning_and_ema(data_root, tmp_path, kind, extra):
    module, tiny = {"gan": (train_gan, TINY_GAN), "vae": (train_vae, TINY_VAE)}[kind]
    a, b = straight_and_resumed(module.main, data_root, [*tiny, *extra], tmp_path)
    assert states_equal(a, b)
    if kind == "gan":
        assert "G_ema" in b["models"]
        assert not torch.equal(b["models"]["G_ema"]["net.0.weight"], b["models"]["G"]["net.0.weight"])
    # the grid of a conditional run has a label column on its left: wider than a plain 8 x 8 grid
    from PIL import Image
    assert Image.open(tmp_path / "resumed" / "samples_epoch_003.png").size[0] > 8 * 66 + 2


def test_vae_symmetries_feed_the_step_turned_and_mirrored_images(monkeypatch):
    """--augment symmetry: each image of the batch reaches the model (as input and as target) in
    one of its 8 rotations and flips; --augment none: as it is."""
    seen, x = {}, torch.rand(64, 3, 64, 64)
    for policy in ("symmetry", "none"):
        args = vae_args([*TINY_VAE, "--precision", "fp32", "--no-channels-last", "--augment", policy])
        trainer = train_vae.VAETrainer(args, checkpoint.networks("vae", vars(args), Dataset()), torch.device("cpu"))

        def record(x, logits, *rest, policy=policy, **kwargs):  # the images the loss is given
            seen[policy] = x
            zero = logits.float().sum() * 0
            return {"loss": zero, "recon": zero, "kl": zero}
        monkeypatch.setattr(trainer.model, "loss", record)
        trainer.step(x, None, log.Meter())
    views = lambda img: [torch.rot90(m, k, (1, 2)) for m in (img, img.flip(2)) for k in range(4)]
    assert torch.equal(seen["none"], x)
    moved = 0
    for a, b in zip(seen["symmetry"], x):
        assert any(torch.equal(a, v) for v in views(b))  # one of the 8 views of its own image
        moved += not torch.equal(a, b)
    assert moved > 40  # 7 in 8 of them turned or mirrored
