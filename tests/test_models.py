"""models/: output shapes, the VAE's KL against torch.distributions, gradients through the
reparameterisation, DCGAN initial weight statistics, and that both models learn on tiny data."""
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from models.dcgan import Discriminator, Generator
from models.vae import VAE, Blur, PatchDiscriminator, gaussian_kl, upsampler


@pytest.mark.parametrize("image_size", [32, 64])
def test_dcgan_shapes(image_size):
    G, D = Generator(nz=16, ngf=8, image_size=image_size), Discriminator(ndf=8, image_size=image_size)
    x = G(torch.randn(5, 16))
    assert x.shape == (5, 3, image_size, image_size)
    assert x.abs().max() <= 1  # Tanh output
    assert D(x).shape == (5,)


def test_dcgan_default_is_the_classic_stack():
    G, D = Generator(), Discriminator()
    widths = [m.out_channels for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert widths == [512, 256, 128, 64, 3]
    assert [m.out_channels for m in D.modules() if isinstance(m, torch.nn.Conv2d)] == [64, 128, 256, 512, 1]


def test_dcgan_rejects_bad_image_size():
    with pytest.raises(ValueError, match="power of two"):
        Generator(image_size=48)


def test_dcgan_init_statistics():
    torch.manual_seed(0)
    for net in (Generator(), Discriminator()):
        convs = torch.cat([m.weight.flatten() for m in net.modules()
                           if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))])
        bn = torch.cat([m.weight for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)])
        bn_bias = torch.cat([m.bias for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)])
        assert abs(convs.mean()) < 1e-3 and abs(convs.std() - 0.02) < 1e-3
        assert abs(bn.mean() - 1) < 5e-3 and abs(bn.std() - 0.02) < 5e-3
        assert torch.all(bn_bias == 0)


def test_vae_shapes():
    vae = VAE(latent_dim=8, widths=(8, 16))
    x = torch.rand(5, 3, 64, 64)
    logits, mu, logvar = vae(x)
    assert logits.shape == x.shape and mu.shape == logvar.shape == (5, 8)
    assert vae.decode(vae.prior_latents(torch.randn(3, 8))).shape == (3, 3, 64, 64)
    assert 0 <= vae.decode(mu).min() and vae.decode(mu).max() <= 1  # Sigmoid output
    deep = VAE(latent_dim=8, widths=(8, 16, 32, 64))
    assert deep.bottom == (64, 4, 4) and deep(x)[0].shape == x.shape


def test_vae_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    x = torch.rand(4, 3, 8, 8)
    logits = torch.randn(4, 3, 8, 8)
    parts = VAE(likelihood="bernoulli").loss(x, logits, mu, logvar, beta=0.5)
    q, p = Normal(mu, torch.exp(0.5 * logvar)), Normal(torch.zeros(4, 6), torch.ones(4, 6))
    torch.testing.assert_close(parts["kl"], kl_divergence(q, p).sum(1).mean())
    bernoulli = torch.distributions.Bernoulli(logits=logits, validate_args=False)  # x is not binary
    torch.testing.assert_close(parts["recon"], -bernoulli.log_prob(x).sum() / 4)
    torch.testing.assert_close(parts["loss"], parts["recon"] + 0.5 * parts["kl"])


def test_gaussian_likelihood_is_the_normal_density_at_the_best_sigma():
    torch.manual_seed(0)
    x, logits = torch.rand(4, 3, 8, 8), torch.randn(4, 3, 8, 8, requires_grad=True)
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    parts = VAE(likelihood="gaussian").loss(x, logits, mu, logvar)
    mean = torch.sigmoid(logits)
    sigma = (mean - x).pow(2).mean().sqrt()
    torch.testing.assert_close(parts["recon"], -Normal(mean, sigma).log_prob(x).sum() / 4)
    # that sigma maximises the likelihood: any other is worse
    for other in (0.9 * sigma, 1.1 * sigma):
        assert -Normal(mean, other).log_prob(x).sum() / 4 > parts["recon"]
    # and holding it fixed in the gradient gives the gradient of the full expression
    parts["recon"].backward()
    held = logits.grad.clone()
    logits.grad = None
    (-Normal(torch.sigmoid(logits), (torch.sigmoid(logits) - x).pow(2).mean().sqrt()).log_prob(x).sum() / 4).backward()
    torch.testing.assert_close(held, logits.grad)
    with pytest.raises(ValueError, match="likelihood"):
        VAE(likelihood="laplace")


def test_fitted_prior_matches_the_codes_it_was_fitted_to():
    torch.manual_seed(0)
    vae = VAE(latent_dim=3, widths=(8, 16))
    eps = torch.randn(20000, 3)
    torch.testing.assert_close(vae.prior_latents(eps), eps)  # before fitting: N(0, I)
    mix = torch.tensor([[2.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, -0.3, 0.2]])
    codes = torch.randn(20000, 3) @ mix.T + torch.tensor([4.0, -1.0, 0.5])
    vae.fit_prior(codes)
    draws = vae.prior_latents(eps)
    torch.testing.assert_close(draws.mean(0), codes.mean(0), atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(draws.T), torch.cov(codes.T), atol=0.05, rtol=0.05)
    assert "prior_mean" in vae.state_dict() and "prior_scale" in vae.state_dict()  # saved with the model


def test_class_mixture_reproduces_a_known_mixture():
    torch.manual_seed(0)
    vae = VAE(latent_dim=2, widths=(8, 16), mixture=3)
    means = torch.tensor([[5.0, 0.0], [-5.0, 1.0], [0.0, -6.0]])
    stds = torch.tensor([[1.0, 0.5], [0.3, 2.0], [1.5, 1.5]])
    labels = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), 30000, replacement=True)
    codes = means[labels] + stds[labels] * torch.randn(30000, 2)
    vae.fit_prior(codes, labels)
    torch.testing.assert_close(vae.class_weights, torch.bincount(labels, minlength=3) / 30000.0)
    torch.testing.assert_close(vae.class_weights, torch.tensor([0.6, 0.3, 0.1]), atol=0.01, rtol=0)
    y = torch.arange(3).repeat_interleave(20000)
    draws = vae.prior_latents(torch.randn(60000, 2), "classes", y)
    for c in range(3):  # each class's draws come from its own component
        torch.testing.assert_close(draws[y == c].mean(0), means[c], atol=0.05, rtol=0)
        torch.testing.assert_close(draws[y == c].std(0), stds[c], atol=0.05, rtol=0.03)
    # the single Gaussian spans all three: its mean is the mixture's
    torch.testing.assert_close(vae.prior_mean.float(), codes.mean(0), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="class per draw"):
        vae.prior_latents(torch.randn(4, 2), "classes")


def test_a_class_without_codes_gets_no_weight():
    vae = VAE(latent_dim=2, widths=(8, 16), mixture=3)
    codes, labels = torch.randn(50, 2) + 3, torch.tensor([0, 2] * 25)
    vae.fit_prior(codes, labels)
    assert vae.class_weights.tolist() == [0.5, 0.0, 0.5]
    torch.testing.assert_close(vae.class_means[1], vae.prior_mean.float())  # falls back to all codes
    assert torch.isfinite(vae.class_scales).all()


def test_class_prior_kl_matches_torch_distributions():
    torch.manual_seed(0)
    vae = VAE(latent_dim=5, widths=(8, 16), num_classes=3, class_prior=True)
    with torch.no_grad():
        vae.prior_mu.normal_()
        vae.prior_logvar.normal_(0, 0.5)
    mu, logvar, y = torch.randn(4, 5), torch.randn(4, 5) * 0.3, torch.tensor([0, 2, 1, 2])
    prior_mu, prior_logvar = vae.prior(y)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(prior_mu, torch.exp(0.5 * prior_logvar))
    expected = torch.distributions.kl_divergence(q, p).sum(1)
    torch.testing.assert_close(gaussian_kl(mu, logvar, prior_mu, prior_logvar), expected)
    x = torch.rand(4, 3, 64, 64)
    loss = vae.loss(x, torch.zeros_like(x), mu, logvar, y)
    torch.testing.assert_close(loss["kl"], expected.mean())
    loss["loss"].backward()  # the prior is learned with the model
    assert vae.prior_mu.grad[[0, 1, 2]].abs().sum(1).gt(0).all()
    # without the class prior the KL is against N(0, I)
    standard = torch.distributions.Normal(torch.zeros(5), torch.ones(5))
    torch.testing.assert_close(gaussian_kl(mu, logvar), torch.distributions.kl_divergence(q, standard).sum(1))
    # drawing from the learned prior of class y
    eps = torch.randn(3, 5)
    torch.testing.assert_close(vae.prior_latents(eps, "standard", y[:3]), prior_mu[:3] + torch.exp(0.5 * prior_logvar[:3]) * eps)


def test_residual_decoder_keeps_shapes_and_adds_depth():
    plain, deep = VAE(latent_dim=8, widths=(8, 16)), VAE(latent_dim=8, widths=(8, 16), res_blocks=2)
    z = torch.randn(2, 8)
    assert deep.decode(z).shape == plain.decode(z).shape == (2, 3, 64, 64)
    convs = lambda m: sum(isinstance(l, torch.nn.Conv2d) for l in m.decoder.modules())
    assert convs(plain) == 0 and convs(deep) == 2 * 2 * 2  # two blocks of two convolutions per resolution


def test_resize_upsampling_draws_no_period_two_grid():
    """A flat feature map comes out of a 4x4 stride-2 transposed convolution as a period-2 grid
    (even and odd pixels sum different taps); nearest resizing then a 3x3 convolution keeps it
    flat away from the border."""
    torch.manual_seed(0)
    flat = torch.ones(1, 4, 8, 8)
    for how, grid in [("transposed", True), ("resize", False)]:
        out = upsampler(4, 3, how)(flat)[..., 2:-2, 2:-2]  # (1, 3, 12, 12), the interior
        assert out.shape == (1, 3, 12, 12)
        spread = (out - out[..., :1, :1]).abs().max().item()
        assert (spread > 1e-3) is grid, (how, spread)
    vae = VAE(latent_dim=8, widths=(8, 16), upsample="resize", res_blocks=1)
    assert vae.decode(torch.randn(2, 8)).shape == (2, 3, 64, 64)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in vae.modules())
    with pytest.raises(ValueError, match="upsample"):
        VAE(upsample="bilinear")


def test_gradient_reaches_mu_and_logvar_through_sampling():
    vae = VAE(latent_dim=8, widths=(8, 16))
    x = torch.rand(4, 3, 64, 64)
    mu, logvar = vae.encode(x)
    mu.retain_grad(), logvar.retain_grad()
    recon = F.binary_cross_entropy_with_logits(vae.decode_logits(vae.reparameterize(mu, logvar)), x)
    recon.backward()  # the reconstruction alone, so no gradient comes from the KL term
    assert mu.grad.abs().sum() > 0 and logvar.grad.abs().sum() > 0
    assert vae.fc_logvar.weight.grad.abs().sum() > 0


def test_vae_overfits_a_few_images():
    torch.manual_seed(0)
    from conftest import make_images
    x = torch.from_numpy(make_images(8)[0]).permute(0, 3, 1, 2).float() / 255
    vae = VAE(latent_dim=8, widths=(8, 16))
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        parts = vae.loss(x, *vae(x))
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        losses.append(parts["loss"].item())
    assert losses[-1] < 0.8 * losses[0]
    mse0 = F.mse_loss(torch.full_like(x, 0.5), x)
    assert F.mse_loss(vae.decode(vae.encode(x)[0]), x) < 0.5 * mse0


def test_gan_steps_change_both_networks_and_stay_finite():
    torch.manual_seed(0)
    G, D = Generator(nz=16, ngf=8), Discriminator(ndf=8)
    before = [p.detach().clone() for p in (*G.parameters(), *D.parameters())]
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    real = torch.rand(8, 3, 64, 64) * 2 - 1
    for _ in range(3):
        fake = G(torch.randn(8, 16))
        loss_d = (F.binary_cross_entropy_with_logits(D(real), torch.ones(8))
                  + F.binary_cross_entropy_with_logits(D(fake.detach()), torch.zeros(8)))
        opt_d.zero_grad(), loss_d.backward(), opt_d.step()
        loss_g = F.binary_cross_entropy_with_logits(D(fake), torch.ones(8))
        opt_g.zero_grad(), loss_g.backward(), opt_g.step()
        assert torch.isfinite(loss_d) and torch.isfinite(loss_g)
    after = [p.detach() for p in (*G.parameters(), *D.parameters())]
    n_g = len(list(G.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(before[:n_g], after[:n_g]))
    assert all(not torch.equal(a, b) for a, b in zip(before[n_g:], after[n_g:]))


def test_the_critics_blur_keeps_flat_images_and_removes_the_finest_lattice():
    """The binomial filter passes a constant and zeroes the period-2 checkerboard (its response
    at the highest frequency is 0), edges included, as mirroring continues the pattern."""
    blur = Blur(3)
    flat = torch.full((1, 3, 8, 8), 0.3)
    torch.testing.assert_close(blur(flat), flat)
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float().expand(1, 3, 8, 8)
    torch.testing.assert_close(blur(checker), torch.full_like(checker, 0.5))
    sharp, blurred = PatchDiscriminator(widths=(8, 16, 32)), PatchDiscriminator(widths=(8, 16, 32), blur=True)
    assert sum(isinstance(m, Blur) for m in blurred.modules()) == 3
    x = torch.rand(2, 3, 64, 64)
    assert blurred(x).shape == sharp(x).shape == (2, 64)
    assert not any(key.endswith("kernel") for key in blurred.state_dict())  # a fixed filter: nothing new to save
