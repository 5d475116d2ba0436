"""The GAN's small-data recipe: each augmentation differentiable, label-preserving, the same for
real and generated images and deterministic under a seed; R1 and LeCam against hand computations;
spectral norm's largest singular value; class-conditional BatchNorm; the auxiliary classifier of
--class-loss and its step by hand; the recipes' settings; exact resume with every new flag on
(torchrun equivalence: tests/test_distributed.py)."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from system import errors

from utils import augment, checkpoint, log
import train_gan
from conftest import TINY_GAN, gan_args, states_equal, straight_and_resumed, vae_args
from data import Dataset
from models import dcgan
from models.dcgan import Discriminator, Generator, LeCamAnchors, r1_penalty


def images(n=6, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", list(augment.OPERATIONS))
def test_each_augmentation_is_differentiable_and_deterministic_under_a_seed(name):
    x = images().requires_grad_(True)
    torch.manual_seed(3)
    a = augment.augment(x, (name,))
    torch.manual_seed(3)
    b = augment.augment(x, (name,))
    assert torch.equal(a, b) and a.shape == x.shape
    weights = torch.randn_like(a)
    (grad,) = torch.autograd.grad((a * weights).sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0  # G's gradient passes through
    torch.manual_seed(4)
    assert not torch.equal(augment.augment(x, (name,)), a)  # another seed, other parameters


def test_augmentation_is_the_same_function_for_real_and_fake():
    """Given the same random numbers, a real and a generated batch holding the same pixels come
    out the same: nothing in the augmentation tells the two apart."""
    x = images()
    fake = x.clone().requires_grad_(True)  # a generated batch carries a graph, real images do not
    u = torch.rand(len(x), augment.draws(augment.parse_policy("all")))
    policy = augment.parse_policy("all")
    assert torch.equal(augment.augment(x, policy, u), augment.augment(fake, policy, u).detach())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_symmetry_gives_each_image_one_of_the_eight_rotations_and_flips(memory_format):
    x = images(16)
    out = augment.symmetry(x.contiguous(memory_format=memory_format), torch.arange(16)[:, None] / 16.0)  # each of the 8 twice
    assert out.is_contiguous(memory_format=memory_format)  # the next convolution gets the layout it expects
    for i in range(16):
        k = i // 2
        expected = torch.rot90(x[i], k % 4, dims=(1, 2))
        expected = expected.flip(2) if k >= 4 else expected
        assert torch.equal(out[i], expected)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_symmetry_passes_the_gradient_back_through_the_same_turn(memory_format):
    """Each symmetry moves pixels without changing them, so the gradient that reaches image i is
    the upstream gradient turned back: the inverse symmetry applied to it."""
    x = images(16).contiguous(memory_format=memory_format).requires_grad_(True)
    upstream = torch.randn(16, *x.shape[1:])
    out = augment.symmetry(x, torch.arange(16)[:, None] / 16.0)
    (grad,) = torch.autograd.grad((out * upstream).sum(), x)
    for i in range(16):
        k = i // 2
        back = upstream[i].flip(2) if k >= 4 else upstream[i]
        assert torch.equal(grad[i], torch.rot90(back, -(k % 4), dims=(1, 2)))


def test_translation_shifts_whole_pixels_and_fills_with_zero():
    x = images(1)
    out = augment.translation(x, torch.tensor([[0.0, 1.0 - 1e-6]]))  # 2 rows up, 2 columns right at 16 px
    assert torch.equal(out[0, :, :-2, 2:], x[0, :, 2:, :-2])
    assert torch.all(out[0, :, -2:, :] == 0) and torch.all(out[0, :, :, :2] == 0)


def test_color_and_cutout_keep_the_cell_in_place():
    x = images(4)
    u = torch.tensor([[0.5, 0.5, 0.5]]).repeat(4, 1)  # brightness +0, saturation x1, contrast x1
    torch.testing.assert_close(augment.color(x, u), x)
    out = augment.cutout(x, torch.full((4, 2), 0.5))
    hole = out == 0
    assert hole.sum() == 4 * 3 * 8 * 8  # a square of half the side
    assert torch.equal(out[~hole], x[~hole])  # every other pixel untouched


def test_unknown_operation_is_refused():
    with pytest.raises(ValueError, match="unknown augmentation 'rotate'"):
        augment.parse_policy("translation,rotate")


class LinearD(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x, y=None):
        return (x * self.w).flatten(1).sum(1) + (0 if y is None else y.float())


def test_r1_of_a_linear_discriminator_is_its_squared_weight_norm():
    w = torch.randn(3, 4, 4)
    D = LinearD(w)
    r1 = r1_penalty(D, torch.randn(5, 3, 4, 4), torch.arange(5))
    torch.testing.assert_close(r1, w.pow(2).sum())
    r1.backward()  # differentiable in D's weights: d||w||^2/dw = 2w
    torch.testing.assert_close(D.w.grad, 2 * w)


def test_lecam_against_a_hand_computation():
    anchors = LeCamAnchors(decay=0.5)
    anchors.real.fill_(1.0)
    anchors.fake.fill_(-1.0)
    real, fake = torch.tensor([2.0, -3.0]), torch.tensor([0.0, 4.0])
    penalty = anchors(real, fake)
    # anchors first move halfway to the batch means: real 1 -> (1 + -0.5) / 2, fake -1 -> (-1 + 2) / 2
    assert anchors.real.item() == 0.25 and anchors.fake.item() == 0.5
    expected = ((2 - 0.5) ** 2 + 0) / 2 + (max(0.25 - 0, 0) ** 2 + 0) / 2
    assert penalty.item() == pytest.approx(expected)


def test_spectral_norm_brings_each_weight_to_a_largest_singular_value_near_one():
    torch.manual_seed(0)
    D = Discriminator(ndf=8, image_size=16, num_classes=3, spectral_norm=True)
    for _ in range(30):  # the power iteration advances once per forward pass in training
        D(torch.randn(4, 3, 16, 16), torch.randint(0, 3, (4,)))
    layers = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Embedding))]
    assert len(layers) == 4  # 2 stride-2 convolutions at 16 px, the output convolution, the class embedding
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert sigma.item() == pytest.approx(1.0, abs=0.05)
    plain = Discriminator(ndf=8, image_size=16)
    assert torch.linalg.matrix_norm(plain.features[0].weight.flatten(1), ord=2) < 0.5  # N(0, 0.02) weights


@pytest.mark.parametrize("labels", ["batchnorm", "concat"])
def test_a_conditional_generator_changes_its_output_with_the_label(labels):
    torch.manual_seed(0)
    G = Generator(nz=8, ngf=8, image_size=16, num_classes=4, labels=labels)
    for module in G.modules():  # labels must matter at initialisation already, not only after training
        if hasattr(module, "scale") and isinstance(module.scale, nn.Embedding):
            nn.init.normal_(module.scale.weight, 1.0, 0.5)
    z = torch.randn(6, 8)
    for mode in (G.train, G.eval):
        mode()
        y = torch.tensor([0, 1, 2, 3, 0, 1])
        a, b = G(z, y), G(z, (y + 1) % 4)
        assert (a - b).abs().mean() > 0.1 * a.abs().mean()
    if labels == "batchnorm":
        assert G.net[0].in_channels == 8  # z alone: the labels enter through the normalisations


def test_the_discriminators_classifier_names_the_class_from_the_image_alone():
    """--class-loss: named=True adds D's class logits to its real-or-fake logits, and trained
    with the labels' cross-entropy alone the head learns which class an image shows (here its
    tint: red or blue noise)."""
    torch.manual_seed(0)
    D = Discriminator(ndf=8, image_size=16, num_classes=2, classifier=2)

    def tinted():
        y = torch.randint(0, 2, (16,))
        x = torch.rand(16, 3, 16, 16) * 2 - 1
        x[:, 0] += 0.5 * (y == 0)[:, None, None]
        x[:, 2] += 0.5 * (y == 1)[:, None, None]
        return x, y
    logits = D(*tinted())
    logits_too, named = D(*tinted(), named=True)
    assert logits.shape == logits_too.shape == (16,) and named.shape == (16, 2)
    opt = torch.optim.Adam(D.parameters(), 1e-3)
    for _ in range(60):
        x, y = tinted()
        loss = F.cross_entropy(D(x, y, named=True)[1], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = tinted()
    with torch.no_grad():
        accuracy = (D(x, y, named=True)[1].argmax(1) == y).float().mean()
    assert accuracy > 0.9, accuracy


def test_a_class_loss_step_against_a_hand_computation():
    """D's loss adds the cross-entropy of the real images' classes (not the generated ones');
    G's adds W times that of the asked-for classes of its images, judged by the updated D."""
    args = train_gan.build_parser().parse_args(["--device", "cpu", *TINY_GAN, "--precision", "fp32", "--conditional",
                                                "--class-loss", "0.5", "--augment", "none", "--ema", "0", "--lecam", "0"])
    train_gan.fill_defaults(args)
    torch.manual_seed(1)
    trainer = train_gan.GANTrainer(args, checkpoint.networks("gan", vars(args), Dataset()), torch.device("cpu"))
    G, D = copy.deepcopy(trainer.G), copy.deepcopy(trainer.D)
    real, y = torch.rand(16, 3, 64, 64) * 2 - 1, torch.arange(16) % 8
    meter = log.Meter()
    torch.manual_seed(0)
    trainer.step(real, y, 1, meter)
    means = meter.means()

    torch.manual_seed(0)
    fake = G(torch.randn(16, args.latent_dim), y).detach()
    with torch.no_grad():
        logits_real, named_real = D(real, y, named=True)
        logits_fake, named_fake = D(fake, y, named=True)
        judged, named_judged = trainer.D(fake, y, named=True)
    against = F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()
    assert means["loss_d"] == pytest.approx((against + F.cross_entropy(named_real, y)).item(), rel=1e-5)
    assert means["loss_d"] != pytest.approx((against + F.cross_entropy(torch.cat([named_real, named_fake]), y.repeat(2))).item(),
                                            rel=1e-3)
    assert means["class_loss"] == pytest.approx(F.cross_entropy(named_judged, y).item(), rel=1e-5)
    assert means["loss_g"] == pytest.approx((F.softplus(-judged).mean() + 0.5 * means["class_loss"]).item(), rel=1e-5)
    assert 0 <= means["d_named"] <= 1 and 0 <= means["fake_named"] <= 1


def test_class_loss_without_a_condition_is_refused_and_writes_nothing(data_root, tmp_path):
    with pytest.raises(errors.UserError, match="--class-loss asks G for the class of each image, which only a "
                                               "--conditional run has"):
        train_gan.main(["--data-root", str(data_root), "--device", "cpu", *TINY_GAN, "--class-loss", "1",
                        "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_gan_checkpoint_from_before_class_loss_resumes_without_a_classifier(data_root, tmp_path):
    common = ["--data-root", str(data_root), "--device", "cpu", "--out", str(tmp_path / "run")]
    train_gan.main([*common, *TINY_GAN, "--conditional", "--epochs", "1"])
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    del ckpt["args"]["class_loss"]
    torch.save(ckpt, tmp_path / "run" / "ckpt.pt")
    train_gan.main([*common, "--epochs", "2", "--resume"])
    resumed = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["args"]["class_loss"] == 0.0
    assert not any(k.startswith("classifier") for k in resumed["models"]["D"])


def test_a_gan_checkpoint_from_before_d_norm_resumes_with_the_batchnorm_it_was_trained_with(data_root, tmp_path):
    common = ["--data-root", str(data_root), "--device", "cpu", "--out", str(tmp_path / "run")]
    train_gan.main([*common, *TINY_GAN, "--d-norm", "batch", "--epochs", "1"])  # the default D before --d-norm
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    del ckpt["args"]["d_norm"]
    torch.save(ckpt, tmp_path / "run" / "ckpt.pt")
    with pytest.raises(errors.UserError, match="--d-norm none differs from its batch"):
        train_gan.main([*common, "--epochs", "2", "--resume", "--d-norm", "none"])
    train_gan.main([*common, "--epochs", "2", "--resume"])
    resumed = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["args"]["d_norm"] == "batch"
    assert any(k.endswith("running_mean") for k in resumed["models"]["D"])


@pytest.mark.parametrize("flags, norm", [([], "none"), (["--conditional"], "batch"), (["--recipe", "paper"], "batch"),
                                        (["--loss", "wgan-gp"], "layer"), (["--d-norm", "batch"], "batch"),
                                        (["--loss", "wgan-gp", "--d-norm", "none"], "none")])
def test_d_norm_follows_the_recipe_and_the_loss_unless_given(flags, norm):
    assert gan_args(flags).d_norm == norm


@pytest.mark.parametrize("norm, module", [("batch", nn.BatchNorm2d), ("layer", nn.GroupNorm), ("none", None)])
def test_d_norm_builds_that_discriminator_and_none_mixes_no_images(norm, module):
    # without the group statistic, which shows D each group's spread on purpose (tested below)
    args = gan_args(["--d-norm", norm, "--mbstd", "0", "--ndf", "8", "--ngf", "8", "--nz", "16"])
    D = dcgan.build(vars(args), Dataset())["D"]
    norms = [m for m in D.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    assert all(isinstance(m, module) for m in norms) and (len(norms) > 0) == (module is not None)
    if norm != "batch":  # each image's score is its own, whatever else is in the batch
        D.train()
        x = torch.randn(4, 3, 64, 64)
        torch.testing.assert_close(D(x)[:2], D(x[:2]))


def test_a_gan_checkpoint_from_before_latent_dim_draws_with_its_nz(tmp_path):
    """The GAN's latent size was saved as nz: such a checkpoint loads, draws and keeps its size."""
    settings = vars(gan_args(["--ndf", "8", "--ngf", "8", "--latent-dim", "16"]))
    settings["nz"] = settings.pop("latent_dim")
    networks = dcgan.build(checkpoint.with_added_settings("gan", settings), Dataset())
    assert networks["G"].latent_dim == 16
    assert gan_args(["--nz", "24"]).latent_dim == 24  # pytorch/examples' flag is the same setting


def test_a_gan_checkpoint_from_before_d_norm_builds_its_discriminator():
    for loss, module in (("bce", nn.BatchNorm2d), ("wgan-gp", nn.GroupNorm)):
        settings = vars(gan_args(["--loss", loss, "--ndf", "8", "--ngf", "8", "--nz", "16"]))
        del settings["d_norm"]
        D = dcgan.build(checkpoint.with_added_settings("gan", settings), Dataset())["D"]
        assert any(isinstance(m, module) for m in D.modules())


@pytest.mark.parametrize("flags", [[], ["--conditional", "--d-norm", "none", "--class-loss", "0.1"],
                                   ["--loss", "wgan-gp"], ["--d-norm", "batch"], ["--mbstd", "4"]])
def test_d_judges_real_and_generated_images_in_one_call_only_without_batchnorm(flags):
    args = gan_args([*TINY_GAN, "--precision", "fp32", *flags])
    trainer = train_gan.GANTrainer(args, checkpoint.networks("gan", vars(args), Dataset()), torch.device("cpu"))
    assert trainer.one_call == ("batch" not in flags)
    torch.manual_seed(0)
    real, fake, y = torch.randn(6, 3, 64, 64), torch.randn(6, 3, 64, 64), torch.randint(0, 8, (6,))
    y = y if "--conditional" in flags else None
    trainer.one_call = True
    together = trainer.judge_both(real, fake, y)
    trainer.one_call = False
    apart = trainer.judge_both(real, fake, y)
    if "batch" in flags:  # BatchNorm normalises each call's batch: judged together, the scores change
        assert not torch.allclose(together[0], apart[0])
        return
    assert (together[2] is None) == (apart[2] is None) == ("--class-loss" not in flags)
    for a, b in zip(together, apart):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_batchnorm_in_a_wgan_gp_critic_is_refused_and_writes_nothing(data_root, tmp_path):
    with pytest.raises(errors.UserError, match="--d-norm batch mixes the images of a batch"):
        train_gan.main(["--data-root", str(data_root), "--device", "cpu", *TINY_GAN, "--loss", "wgan-gp",
                        "--d-norm", "batch", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def run_config(out):
    return json.loads((out / "config.json").read_text())


def test_the_paper_recipe_is_the_plain_dcgan(data_root, tmp_path):
    common = ["--data-root", str(data_root), "--device", "cpu", "--epochs", "1", "--ngf", "8", "--ndf", "8", "--nz", "16"]
    train_gan.main([*common, "--recipe", "paper", "--out", str(tmp_path / "paper")])
    config = run_config(tmp_path / "paper")
    assert (config["batch_size"], config["ema"], config["augment"], config["lecam"], config["r1"],
            config["spectral_norm"], config["d_norm"]) == (64, 0.0, "none", 0.0, 0.0, False, "batch")
    # the same run spelled out flag by flag, on top of the default recipe
    train_gan.main([*common, "--batch-size", "64", "--ema", "0", "--augment", "none", "--lecam", "0", "--r1", "0",
                    "--no-spectral-norm", "--d-norm", "batch", "--mbstd", "0", "--out", str(tmp_path / "flags")])
    a = checkpoint.load_checkpoint(tmp_path / "paper" / "ckpt.pt")
    b = checkpoint.load_checkpoint(tmp_path / "flags" / "ckpt.pt")
    assert states_equal(a, b) and set(a["models"]) == {"G", "D"}


@pytest.mark.parametrize("flags, lecam", [([], 0.0), (["--conditional"], 0.01), (["--conditional", "--lecam", "0"], 0.0),
                                          (["--recipe", "paper", "--conditional"], 0.0)])
def test_a_conditional_small_data_run_adds_lecam(flags, lecam):
    args = gan_args(flags)
    assert args.lecam == lecam


def test_lazy_r1_changes_only_the_batches_it_falls_on(data_root, tmp_path):
    """--r1-every N adds N times the penalty on every N-th batch and nothing on the others: a run
    shorter than N batches learns exactly as one without R1, and one as long does not."""
    common = ["--data-root", str(data_root), "--device", "cpu", "--epochs", "1", "--ngf", "8", "--ndf", "8",
              "--nz", "16", "--batch-size", "16", "--subset", "48"]  # 3 batches
    runs = {name: tmp_path / name for name in ("none", "late", "due")}
    train_gan.main([*common, "--r1", "0", "--out", str(runs["none"])])
    train_gan.main([*common, "--r1", "1", "--r1-every", "4", "--out", str(runs["late"])])
    train_gan.main([*common, "--r1", "1", "--r1-every", "3", "--out", str(runs["due"])])
    none, late, due = (checkpoint.load_checkpoint(runs[n] / "ckpt.pt") for n in ("none", "late", "due"))
    assert states_equal(none, late)
    assert not states_equal(none, due)


@pytest.mark.parametrize("flags, r1, every", [([], 0.1, 16), (["--conditional"], 0.1, 16), (["--loss", "wgan-gp"], 0.0, 16),
                                              (["--loss", "hinge"], 0.1, 16), (["--recipe", "paper"], 0.0, 1),
                                              (["--r1", "1", "--r1-every", "1"], 1.0, 1)])
def test_the_default_recipe_adds_lazy_r1_except_under_wgan_gp(flags, r1, every):
    args = gan_args(flags)
    assert (args.r1, args.r1_every) == (r1, every)


@pytest.mark.parametrize("flags, batch", [([], 32), (["--conditional"], 32), (["--recipe", "paper"], 64),
                                         (["--batch-size", "128"], 128)])
def test_the_default_recipe_trains_batches_of_32(flags, batch):
    args = gan_args(flags)
    assert args.batch_size == batch


def test_resume_is_exact_with_every_small_data_flag(data_root, tmp_path):
    flags = [*TINY_GAN, "--conditional", "--g-labels", "batchnorm", "--augment", "all", "--lecam", "0.1", "--r1", "1",
             "--r1-every", "2", "--spectral-norm", "--d-norm", "layer", "--ema", "0.9", "--class-loss", "1"]
    a, b = straight_and_resumed(train_gan.main, data_root, flags, tmp_path)
    assert states_equal(a, b) and {"G", "D", "G_ema", "lecam"} <= a["models"].keys()
    assert "classifier.weight" in a["models"]["D"]
    assert any("parametrizations" in k for k in a["models"]["D"])  # spectral norm's u and v are saved
    assert a["models"]["lecam"]["real"] != 0
    record = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["r1"] > 0 and record["lecam"] >= 0 and record["class_loss"] > 0 and 0 <= record["d_named"] <= 1


def test_flip_mirrors_left_to_right_where_u_is_at_least_one_half():
    x = images(8)
    u = torch.tensor([0.0, 0.2, 0.49, 0.5, 0.7, 0.99, 0.1, 0.6])[:, None]
    out = augment.flip(x, u)
    for i in range(8):
        assert torch.equal(out[i], x[i].flip(2) if u[i] >= 0.5 else x[i])


def test_every_dataset_has_its_symmetries_and_the_recipes_follow_them(capsys):
    """Cells and tissue turn every way, OCT scans, fundus photographs and breast ultrasound only
    mirror, chest X-rays and CT slices keep their up and side; the default recipes of both scripts
    take the dataset's, the paper's none, and a typed --augment wins with a warning where it
    turns images that never are."""
    from data import DATASETS, SYMMETRIES
    assert set(SYMMETRIES) == set(DATASETS) and set(SYMMETRIES.values()) == {"symmetry", "flip", "none"}
    for name, size, want in (("bloodmnist", 64, "symmetry"), ("octmnist", 28, "flip"), ("pneumoniamnist", 28, "none")):
        flags = ["--dataset", name, "--size", str(size)]
        assert gan_args(flags).augment == want and vae_args(flags).augment == want
        assert gan_args([*flags, "--recipe", "paper"]).augment == "none"
    import train_gan
    capsys.readouterr()
    pneumonia = Dataset("pneumoniamnist", 28)
    train_gan.check_settings(gan_args(["--dataset", "pneumoniamnist", "--size", "28", "--augment", "translation"]), pneumonia)
    assert capsys.readouterr().err == ""
    train_gan.check_settings(gan_args(["--dataset", "pneumoniamnist", "--size", "28", "--augment", "flip,color"]), pneumonia)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--augment flip: pneumoniamnist images have an up and a side" in err[0] \
        and "--augment none" in err[0]


def test_a_d_out_of_balance_for_three_epochs_is_named_with_what_to_try():
    """D near chance, or far ahead of G, in each of the last three epochs: the run says which, and
    what to try; two such epochs, or one in balance among them, say nothing."""
    from train_gan import BALANCE
    from utils.log import balance
    near = [{"d_x": 0.505, "d_g_z": 0.495}] * 3
    ahead = [{"d_x": 0.95, "d_g_z": 0.04}] * 3
    state, line = balance(near, *BALANCE["bce"])
    assert state == "chance" and "--recipe paper" in line and "d_x 0.51, d_g_z 0.49" in line
    assert balance([{"d_x": 0.55, "d_g_z": 0.45}] * 3, *BALANCE["bce"]) is None  # the default's own, teaching G
    state, line = balance(ahead, *BALANCE["bce"])
    assert state == "overpowered" and "--keep-every" in line
    assert balance(near[:2], *BALANCE["bce"]) is None
    assert balance([near[0], {"d_x": 0.75, "d_g_z": 0.3}, near[0]], *BALANCE["bce"]) is None
    assert balance([{"d_real": 0.05, "d_fake": 0.0}] * 3, *BALANCE["hinge"])[0] == "chance"
    assert "wgan-gp" not in BALANCE  # a critic's scores have no chance level


def test_the_group_spread_is_each_groups_std_and_never_mixes_the_two_sets():
    torch.manual_seed(0)
    h = torch.randn(8, 5, 3, 3)
    for layout in (torch.contiguous_format, torch.channels_last):
        spread = dcgan.group_spread(h.contiguous(memory_format=layout), 4, sets=2)
        for group in (slice(0, 4), slice(4, 8)):  # the reference: the group's std per value, averaged
            expected = h[group].std(0, unbiased=False).mean()
            torch.testing.assert_close(spread[group], expected.expand(4), rtol=1e-4, atol=1e-6)
    # two sets of 3: groups of 3, the largest divisor of 3 not above 4, one in each set
    spread = dcgan.group_spread(h[:6], 4, sets=2)
    torch.testing.assert_close(spread[:3], h[:3].std(0, unbiased=False).mean().expand(3), rtol=1e-4, atol=1e-6)

    # D reads it as one more input channel of its last layer: the same logits as that layer on
    # the features with a constant map of the spread appended
    D = Discriminator(8, 3, 64, norm="none", mbstd=4)
    x = torch.randn(8, 3, 64, 64)
    features = D.features(x)
    plane = dcgan.group_spread(features, 4, sets=2)[:, None, None, None].expand(8, 1, *features.shape[2:])
    torch.testing.assert_close(D(x, sets=2), D.out(torch.cat([features, plane], 1)).flatten(), rtol=1e-5, atol=1e-6)

    D = Discriminator(8, 3, 64, norm="none", mbstd=4)
    real, fake = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    judged = D(torch.cat([real, fake]), sets=2)
    # the real images' scores do not depend on the generated ones judged beside them
    torch.testing.assert_close(judged[:4], D(torch.cat([real, 3 * fake]), sets=2)[:4])
    torch.testing.assert_close(judged[:4], D(real))
    # but an image's score depends on the others of its group: D sees their spread
    assert not torch.allclose(D(real)[0], D(torch.cat([real[:1], 3 * real[1:]]))[0])


@pytest.mark.parametrize("flags, group", [([], 4), (["--conditional"], 0), (["--recipe", "paper"], 0),
                                          (["--loss", "wgan-gp"], 0), (["--mbstd", "2"], 2),
                                          (["--conditional", "--mbstd", "4"], 4)])
def test_mbstd_follows_the_recipe_and_the_loss_unless_given(flags, group):
    assert gan_args(flags).mbstd == group


def test_mbstd_is_refused_under_wgan_gp_and_absent_from_older_checkpoints(data_root, tmp_path):
    with pytest.raises(errors.UserError, match="--mbstd 4 mixes the images of a group"):
        train_gan.main(["--data-root", str(data_root), "--device", "cpu", *TINY_GAN, "--loss", "wgan-gp",
                        "--mbstd", "4", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    settings = vars(gan_args(["--mbstd", "4", "--ndf", "8", "--ngf", "8", "--nz", "16"]))
    del settings["mbstd"]  # a checkpoint from before the setting: D without it
    assert dcgan.build(checkpoint.with_added_settings("gan", settings), Dataset())["D"].mbstd == 0
