"""The VAE-GAN (train_vae.py --adversarial): the patch discriminator's shapes and spectral norm,
that it learns to tell sharp images from blurred ones and (--critic-labels) an image of its class
from the same image under another, its projection term against a hand computation, its
auxiliary classifier (--class-loss) and the D step that teaches it the real images' classes
alone, the discriminator's terms of the loss against a hand computation, the step that trains
each network on its own loss, exact resume (also of a checkpoint written before --critic-labels
and --recipe), the flags' defaults, the default recipe (the same run as its flags typed out), and
the refusal of settings it cannot serve. Two processes against one:
tests/test_distributed.py."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from system import errors

from utils import checkpoint, log
import train_vae
from conftest import (TINY_VAE, run_script, states_equal, stopped_and_resumed, straight_and_resumed, vae_args,
                      write_npz)
from data import Dataset
from models.dcgan import discriminator_loss
from models.vae import VAE, PatchDiscriminator


@pytest.mark.parametrize("size, widths, patches", [(64, (8, 16, 32), 8 * 8), (28, (8, 16, 32), 3 * 3),
                                                   (64, (8, 16, 32, 64, 128, 256), 1)])
def test_patch_discriminator_gives_one_logit_per_patch(size, widths, patches):
    for channels in (1, 3):
        D = PatchDiscriminator(channels, widths)
        assert D(torch.rand(5, channels, size, size)).shape == (5, patches)


def test_patch_discriminator_weights_have_largest_singular_value_one():
    torch.manual_seed(0)
    D = PatchDiscriminator(3, (8, 16, 32), num_classes=5)
    for _ in range(30):  # one power iteration per forward pass in training
        D(torch.rand(2, 3, 32, 32), torch.tensor([0, 4]))
    D.eval()
    weighted = [m for m in D.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Embedding))]
    assert len(weighted) == 5
    for m in weighted:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2).item()
        assert sigma == pytest.approx(1.0, abs=0.05)


def test_patch_discriminator_learns_to_tell_sharp_images_from_blurred_ones():
    """What the VAE-GAN asks of it: speckled images (real) against their 3x3 box blur (fake)."""
    torch.manual_seed(0)
    D = PatchDiscriminator(3, (8, 16, 32))
    opt = torch.optim.Adam(D.parameters(), 2e-3, betas=(0.5, 0.999))
    for _ in range(60):
        real = torch.rand(16, 3, 16, 16)
        blurred = F.avg_pool2d(real, 3, 1, 1, count_include_pad=False)
        logits = D(torch.cat([real, blurred]))
        loss = F.softplus(-logits[:16]).mean() + F.softplus(logits[16:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        real = torch.rand(16, 3, 16, 16)
        d_real = torch.sigmoid(D(real)).mean()
        d_blurred = torch.sigmoid(D(F.avg_pool2d(real, 3, 1, 1, count_include_pad=False))).mean()
    assert d_real > 0.8 and d_blurred < 0.2, (d_real, d_blurred)


def test_projection_adds_the_class_embedding_times_the_features_at_every_patch():
    torch.manual_seed(0)
    D = PatchDiscriminator(3, (8, 16, 32), num_classes=4).eval()
    x, y = torch.rand(3, 3, 64, 64), torch.tensor([0, 3, 3])
    with torch.no_grad():
        h = D.net[:-1](x * 2 - 1)  # (3, 32, 8, 8)
        unconditional = D.net[-1](h).flatten(1)
        by_hand = unconditional + (h * D.embed.weight[y][:, :, None, None]).sum(1).flatten(1)
        assert torch.allclose(D(x, y), by_hand, atol=1e-5)
        assert not torch.allclose(D(x, y), D(x, torch.tensor([1, 0, 2])))


def tinted_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """16 noise images of two classes told apart by colour alone: class 0 reddish, class 1 bluish."""
    tint = torch.tensor([[1.0, 0.2, 0.2], [0.2, 0.2, 1.0]])
    y = torch.randint(0, 2, (16,))
    return torch.rand(16, 3, 16, 16) * tint[y][:, :, None, None], y


def train_on_tinted_batches(D: PatchDiscriminator, loss_of) -> tuple[torch.Tensor, torch.Tensor]:
    """60 Adam steps of loss_of(D, x, y) on fresh tinted batches; returns a fresh batch to judge."""
    opt = torch.optim.Adam(D.parameters(), 2e-3, betas=(0.5, 0.999))
    for _ in range(60):
        loss = loss_of(D, *tinted_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tinted_batch()


def test_patch_discriminator_learns_which_class_an_image_shows():
    """With the class it can tell an image under its own class (real) from the same image under
    the other class (fake), which no discriminator of the image alone can."""
    torch.manual_seed(0)

    def own_against_other(D, x, y):
        logits = D(torch.cat([x, x]), torch.cat([y, 1 - y]))
        return F.softplus(-logits[:16]).mean() + F.softplus(logits[16:]).mean()
    D = PatchDiscriminator(3, (8, 16, 32), num_classes=2)
    x, y = train_on_tinted_batches(D, own_against_other)
    with torch.no_grad():
        d_own, d_other = torch.sigmoid(D(x, y)).mean(), torch.sigmoid(D(x, 1 - y)).mean()
    assert d_own > 0.8 and d_other < 0.2, (d_own, d_other)


def test_auxiliary_classifier_names_the_class_from_the_image_alone():
    """--class-loss: asked with named=True, D returns class logits after its patch logits, and trained with the
    cross-entropy of the labels alone it learns which class an image shows."""
    torch.manual_seed(0)
    D = PatchDiscriminator(3, (8, 16, 32), classifier=2)
    patches, named = D(torch.rand(5, 3, 64, 64), named=True)
    assert patches.shape == (5, 64) and named.shape == (5, 2) and D(torch.rand(5, 3, 64, 64)).shape == (5, 64)
    x, y = train_on_tinted_batches(D, lambda D, x, y: F.cross_entropy(D(x, named=True)[1], y))
    with torch.no_grad():
        accuracy = (D(x, named=True)[1].argmax(1) == y).float().mean()
    assert accuracy > 0.9, accuracy


def test_class_loss_trains_the_classifier_on_real_images_and_asks_the_vae_for_named_reconstructions():
    """The D step adds the cross-entropy of the real images' classes alone (not of the
    reconstructions'), and the VAE's loss gains the class_loss term from D's classifier."""
    args = vae_args(["--device", "cpu", *TINY_VAE, "--adversarial", "0.01", "--class-loss", "0.01", "--no-critic-labels"])
    torch.manual_seed(0)
    trainer = train_vae.VAETrainer(args, checkpoint.networks("vae", vars(args), Dataset()), torch.device("cpu"))
    x, labels = torch.rand(16, 3, 64, 64), torch.arange(16) % 8
    recon = torch.rand(16, 3, 64, 64)
    with torch.no_grad():
        patches, named = trainer.D(torch.cat([x, recon]), named=True)
        real_against_fake = discriminator_loss("bce", patches[:16], patches[16:])
        by_hand = real_against_fake + F.cross_entropy(named[:16], labels)
        both = real_against_fake + F.cross_entropy(named, labels.repeat(2))
    meter = log.Meter()
    trainer.critic_step(x, recon, labels, meter)
    assert meter.means()["loss_d"] == pytest.approx(by_hand.item(), rel=1e-4)
    assert meter.means()["loss_d"] != pytest.approx(both.item(), rel=1e-3)  # the test can tell them apart
    meter = log.Meter()
    trainer.step(x, labels, meter)
    means = meter.means()
    assert {"d_named", "recon_named", "class_loss"} <= means.keys()
    assert 0 <= means["recon_named"] <= 1 and means["class_loss"] > 0


def test_adversarial_term_is_weighed_in_squared_error_per_pixel():
    torch.manual_seed(0)
    vae = VAE(latent_dim=4, widths=(8,), image_size=8)
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        logits, mu, logvar = vae(x)
    plain = vae.loss(x, logits, mu, logvar)
    adversarial = torch.tensor(0.7)
    named = torch.tensor(1.3)
    parts = vae.loss(x, logits, mu, logvar, critic={"adversarial": (adversarial, 0.01), "class_loss": (named, 0.002)})
    var = (torch.sigmoid(logits) - x).pow(2).mean()  # the Gaussian's sigma^2: the batch's MSE
    expected = (0.01 * 0.7 + 0.002 * 1.3) * (3 * 8 * 8) / (2 * var)
    assert parts["loss"] - plain["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert parts["adversarial"] == pytest.approx(0.7) and parts["class_loss"] == pytest.approx(1.3)
    assert parts["recon"] == plain["recon"]
    bernoulli = VAE(latent_dim=4, widths=(8,), image_size=8, likelihood="bernoulli")
    with pytest.raises(ValueError, match="Gaussian"):
        bernoulli.loss(x, *bernoulli(x), critic={"adversarial": (adversarial, 0.01)})


def test_each_network_learns_from_its_own_loss_only(monkeypatch):
    """A step trains D on real against reconstructed images, then the VAE on the ELBO plus the
    term from the updated D, whose weights that second backward pass leaves alone."""
    args = vae_args(["--device", "cpu", *TINY_VAE, "--adversarial", "0.01"])
    torch.manual_seed(0)
    trainer = train_vae.VAETrainer(args, checkpoint.networks("vae", vars(args), Dataset()), torch.device("cpu"))
    critic_grads = []
    critic_step = trainer.critic_step

    def recording(*a):
        critic_step(*a)
        critic_grads.append([p.grad.clone() for p in trainer.D.parameters()])
    monkeypatch.setattr(trainer, "critic_step", recording)
    vae_before = [p.detach().clone() for p in trainer.model.parameters()]
    meter = log.Meter()
    trainer.step(torch.rand(16, 3, 64, 64), torch.arange(16) % 8, meter)  # D reads the classes
    # the VAE's backward pass added nothing to D's gradients from its own step
    assert all(torch.equal(p.grad, g) for p, g in zip(trainer.D.parameters(), critic_grads[0]))
    assert all(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), vae_before))
    means = meter.means()
    assert {"loss_d", "d_x", "d_recon", "adversarial"} <= means.keys()
    assert 0 < means["d_x"] < 1 and means["adversarial"] == pytest.approx(-math.log(means["d_recon"]), rel=0.2)


@pytest.mark.parametrize("flags, classes", [([], True), (["--conditional"], True), (["--no-critic-labels"], False),
                                            (["--conditional", "--upsample", "resize"], True),
                                            (["--conditional", "--class-loss", "0.01"], True)],
                         ids=["default", "conditional", "no-critic-labels", "resize", "class-loss"])
def test_vae_gan_resumes_exactly_and_its_checkpoint_samples(data_root, tmp_path, flags, classes):
    a, b = straight_and_resumed(train_vae.main, data_root, [*TINY_VAE, "--adversarial", "0.01", *flags], tmp_path,
                                epochs=2)
    assert b["args"]["critic_labels"] is classes and any(k.startswith("embed.") for k in b["models"]["critic"]) is classes
    named = any(k.startswith("classifier.") for k in b["models"]["critic"])
    assert named is ("--class-loss" in flags) and b["args"]["class_loss"] == (0.01 if named else 0.0)
    assert {"vae", "critic"} == b["models"].keys() == b["optimizers"].keys()
    assert states_equal(a, b)
    record = json.loads((tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"d_x", "d_recon", "adversarial", "loss_d"} <= record.keys()
    r = run_script("sample.py", tmp_path / "straight" / "ckpt.pt", "--out", tmp_path / "grid.png")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "grid.png").is_file()


def test_adversarial_with_bernoulli_is_refused_and_writes_nothing(data_root, tmp_path):
    with pytest.raises(errors.UserError, match="--adversarial is weighed by the Gaussian"):
        train_vae.main(["--data-root", str(data_root), "--device", "cpu", *TINY_VAE, "--likelihood", "bernoulli",
                        "--adversarial", "0.01", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_critic_labels_on_a_multi_label_set_is_refused_and_writes_nothing(tmp_path):
    path = write_npz(tmp_path / "chestmnist.npz", sizes=(16, 4, 4), dataset="chestmnist", size=28)
    with pytest.raises(errors.UserError, match="--critic-labels: chestmnist is multi-label"):
        train_vae.main(["--dataset", "chestmnist", "--size", "28", "--data-root", str(path), "--device", "cpu",
                        *TINY_VAE, "--adversarial", "0.01", "--critic-labels", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [([], "--class-loss trains a classifier head of the patch discriminator; "
                                                 "add --adversarial"),
                                            (["--adversarial", "0.01", "--dataset", "chestmnist", "--size", "28"],
                                             "--class-loss: chestmnist is multi-label")])
def test_class_loss_without_a_discriminator_or_one_class_is_refused_and_writes_nothing(data_root, tmp_path, flags,
                                                                                      message):
    if "chestmnist" in flags:
        data_root = write_npz(tmp_path / "chestmnist.npz", sizes=(16, 4, 4), dataset="chestmnist", size=28)
    with pytest.raises(errors.UserError, match=message):
        train_vae.main(["--data-root", str(data_root), "--device", "cpu", *TINY_VAE, "--class-loss", "0.01", *flags,
                        "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_critic_labels_default_follows_the_discriminator_and_the_labels():
    for flags, expected in (([], True), (["--recipe", "plain"], False), (["--recipe", "plain", "--adversarial", "0.01"], True),
                            (["--dataset", "chestmnist", "--size", "28"], False)):
        args = vae_args(flags)
        assert args.critic_labels is expected, flags


SETTINGS = ("batch_size", "likelihood", "augment", "schedule", "upsample", "res_blocks", "adversarial", "class_loss")


@pytest.mark.parametrize("flags, changed", [
    ([], {}),
    (["--conditional"], {"adversarial": 0.001}),
    (["--recipe", "plain"], {"batch_size": 32, "schedule": "constant", "upsample": "transposed", "res_blocks": 0,
                             "adversarial": 0.0, "class_loss": 0.0}),
    (["--recipe", "textbook", "--conditional"], {"batch_size": 128, "likelihood": "bernoulli", "augment": "none",
                                                 "schedule": "constant", "upsample": "transposed", "res_blocks": 0,
                                                 "adversarial": 0.0, "class_loss": 0.0}),
    # what the recipe's discriminator needs: the Gaussian likelihood, and one class per image for its classifier
    (["--likelihood", "bernoulli"], {"likelihood": "bernoulli", "adversarial": 0.0, "class_loss": 0.0}),
    (["--adversarial", "0"], {"adversarial": 0.0, "class_loss": 0.0}),
    (["--dataset", "chestmnist", "--size", "28"], {"class_loss": 0.0, "augment": "none"}),  # chest X-rays have an up
    (["--batch-size", "64", "--class-loss", "0.01"], {"batch_size": 64, "class_loss": 0.01})],
    ids=["default", "conditional", "plain", "textbook", "bernoulli", "no-adversarial", "multi-label", "typed"])
def test_the_default_recipe_is_the_vae_gan_and_typed_flags_win(flags, changed):
    args = vae_args(flags)
    vae_gan = dict(batch_size=16, likelihood="gaussian", augment="symmetry", schedule="cosine", upsample="resize",
                   res_blocks=1, adversarial=0.0003, class_loss=0.001)
    assert {key: getattr(args, key) for key in SETTINGS} == {**vae_gan, **changed}


def test_the_default_recipe_trains_as_its_flags_typed_out_and_resumes_exactly(data_root, tmp_path, monkeypatch):
    """A run of the default recipe is bit for bit the run with every setting it fills typed on
    top of the plain recipe (so a table row of the one stands for the other), and resumes exactly
    from a stop mid-epoch (its cosine schedule follows --epochs, so the resumed run keeps them)."""
    tiny = ["--data-root", str(data_root), "--device", "cpu", "--epochs", "2", "--widths", "8,16", "--latent-dim", "8",
            "--subset", "64"]
    a, b = stopped_and_resumed(train_vae.main, tiny, tmp_path, monkeypatch)
    assert states_equal(a, b) and a["args"]["recipe"] == "vae-gan"
    assert {key: a["args"][key] for key in SETTINGS} == dict(
        batch_size=16, likelihood="gaussian", augment="symmetry", schedule="cosine", upsample="resize", res_blocks=1,
        adversarial=0.0003, class_loss=0.001)
    assert a["args"]["critic_labels"] is True and any(k.startswith("classifier.") for k in a["models"]["critic"])
    train_vae.main([*tiny, "--recipe", "plain",
                    "--batch-size", "16", "--schedule", "cosine", "--upsample", "resize", "--res-blocks", "1",
                    "--adversarial", "0.0003", "--class-loss", "0.001", "--out", str(tmp_path / "typed")])
    assert states_equal(a, checkpoint.load_checkpoint(tmp_path / "typed" / "ckpt.pt"))


def test_a_checkpoint_from_before_critic_labels_resumes_without_them(data_root, tmp_path):
    """A VAE-GAN checkpoint whose settings lack critic_labels, upsample, class_loss and recipe had
    a D without classes or a classifier and a transposed-convolution decoder: it resumes and loads
    as it was trained, not with today's defaults."""
    common = ["--data-root", str(data_root), "--device", "cpu", "--out", str(tmp_path / "run")]
    train_vae.main([*common, *TINY_VAE, "--adversarial", "0.01", "--no-critic-labels", "--epochs", "1"])
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    for key in ("critic_labels", "upsample", "class_loss", "recipe"):
        del ckpt["args"][key]
    torch.save(ckpt, tmp_path / "run" / "ckpt.pt")
    assert checkpoint.load_checkpoint(tmp_path / "run" / "ckpt.pt")["args"]["upsample"] == "transposed"
    train_vae.main([*common, "--epochs", "2", "--resume"])
    resumed = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["args"]["critic_labels"] is False
    assert resumed["args"]["upsample"] == "transposed" and resumed["args"]["class_loss"] == 0.0
    assert resumed["args"]["recipe"] == "plain" and resumed["args"]["batch_size"] == 16  # its own batch
