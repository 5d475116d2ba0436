"""DCGAN generator and discriminator (Radford, Metz & Chintala, 2016), with the options a user
reaches for next: class conditioning, a critic without BatchNorm for WGAN-GP, and the losses.

The generator maps z of size `nz` to an image by doubling the resolution from 4x4 with strided
transposed convolutions; the discriminator mirrors it and ends in one logit per image. 64x64
gives the classic 4 -> 8 -> 16 -> 32 -> 64 stack, and any power of two from 16 up works the same
way. MedMNIST's 28 and 224 are 7 times a power of two: their stacks start (and D ends) at 7x7,
7 -> 14 -> 28 and 7 -> 14 -> ... -> 224.

Conditioning (num_classes > 0): the discriminator adds a projection term <embed(y), pooled
features> to its logit (Miyato & Koyama, 2018). The generator either reads [z, one_hot(y)]
(labels="concat", the conditional DCGAN of Mirza & Osindero 2014) or normalises every layer with
class-conditional BatchNorm (labels="batchnorm", as in SNGAN and BigGAN): each class gets its
own scale and shift after every normalisation, which conditions each layer, not only the input.

For small data (train_gan.py's --spectral-norm, --r1, --lecam): spectral normalisation of D's
weights (Miyato et al. 2018), the R1 penalty (Mescheder et al. 2018) and LeCam regularisation
(Tseng et al. 2021). With mbstd > 0 (--mbstd) D's last layer also reads how much the images of
its group differ (minibatch standard deviation, Karras et al. 2018, section 3): a D without
BatchNorm judges each image alone and cannot otherwise see that G draws too few kinds of image.
With classifier > 0 (train_gan.py's --class-loss) D also names each image's class, an auxiliary
classifier (Odena et al. 2017) beside the projection.

Drawing: grids and evaluations draw from an exponential moving average of G's weights (ema_update),
whose BatchNorm statistics are re-estimated on a few batches of noise before it draws
(recalibrate_batchnorm). Generator.generate is the drawing interface it shares with the VAE.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("bce", "hinge", "wgan-gp")
LABEL_INPUTS = ("concat", "batchnorm")  # how a conditional generator reads its labels
D_NORMS = ("batch", "layer", "none")  # what normalises D's hidden layers
VALUE_RANGE = (-1.0, 1.0)  # the generator ends in Tanh


def _stack(image_size: int) -> tuple[int, int]:
    """(start, n): the side of the first feature map and the stride-2 layers that take it to
    image_size: (4, 4) for 64x64, (7, 2) for 28x28, (7, 5) for 224x224."""
    for start in (4, 7):
        n = round(math.log2(image_size / start))
        if n >= 2 and start * 2 ** n == image_size:
            return start, n
    raise ValueError(f"image_size must be 4 or 7 times a power of two, at least 16, got {image_size}")


def _norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm mixes the samples of a batch, which the gradient penalty of WGAN-GP forbids;
    'layer' normalises each sample on its own (GroupNorm with one group)."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be batch, layer or none, got {kind!r}")


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine part, then a scale and shift per class:
    x (B, C, H, W), labels (B,) -> gamma[y] * normalised(x) + beta[y]."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.scale = nn.Embedding(num_classes, channels)
        self.shift = nn.Embedding(num_classes, channels)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.scale(y)[:, :, None, None] + self.shift(y)[:, :, None, None]


def init_dcgan_weights(module: nn.Module) -> None:
    # Radford et al. 2016, section 4: weights from N(0, 0.02); BatchNorm scale from N(1, 0.02).
    # (apply() reaches a module's children first, so a ConditionalBatchNorm2d sets its own last.)
    if isinstance(module, ConditionalBatchNorm2d):
        nn.init.normal_(module.scale.weight, 1.0, 0.02)
        nn.init.zeros_(module.shift.weight)
    elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Embedding)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)) and module.weight is not None:
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """z (B, nz) [, labels (B,)] -> images (B, nc, image_size, image_size) in [-1, 1].

    labels: how a conditional generator (num_classes > 0) reads its labels, "concat" or
    "batchnorm" (see the module's docstring)."""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3, image_size: int = 64,
                 num_classes: int = 0, labels: str = "concat"):
        super().__init__()
        if labels not in LABEL_INPUTS:
            raise ValueError(f"labels must be one of {LABEL_INPUTS}, got {labels!r}")
        self.latent_dim, self.num_classes = nz, num_classes
        self.concat = num_classes if labels == "concat" else 0  # one-hot entries appended to z
        start, n = _stack(image_size)
        width = ngf * 2 ** (n - 1)  # 512 for ngf=64 at 64x64

        def norm(channels: int) -> nn.Module:
            if num_classes and labels == "batchnorm":
                return ConditionalBatchNorm2d(channels, num_classes)
            return nn.BatchNorm2d(channels)
        # (B, nz [+ classes], 1, 1) -> (B, width, start, start)
        layers = [nn.ConvTranspose2d(nz + self.concat, width, start, 1, 0, bias=False), norm(width), nn.ReLU(True)]
        for _ in range(n - 1):  # each block halves the width and doubles the resolution
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), norm(width // 2), nn.ReLU(True)]
            width //= 2
        # (B, ngf, S/2, S/2) -> (B, nc, S, S)
        layers += [nn.ConvTranspose2d(width, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)

    @property
    def draws_classes(self) -> bool:
        """Whether generate() takes a class for each draw."""
        return self.num_classes > 0

    default_temperature = 1.0  # z is drawn from N(0, I) itself

    def generate(self, noise: torch.Tensor, labels: torch.Tensor | None = None,
                 temperature: float | None = None) -> torch.Tensor:
        """Standard normal noise (B, latent_dim) [and classes (B,)] -> images (B, nc, S, S) in [0, 1].
        temperature scales the noise (default 1): below 1, draws keep nearer z = 0."""
        t = self.default_temperature if temperature is None else temperature
        return self(noise * t, labels) * 0.5 + 0.5

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.concat:
            z = torch.cat([z, F.one_hot(y, self.num_classes).to(z.dtype)], 1)
        x = z.view(z.shape[0], -1, 1, 1)
        for layer in self.net:
            x = layer(x, y) if isinstance(layer, ConditionalBatchNorm2d) else layer(x)
        return x


class Discriminator(nn.Module):
    """images (B, nc, S, S) [, labels (B,)] -> logits (B,). No sigmoid: the losses take logits.

    norm="batch" is the DCGAN discriminator; "layer" or "none" make a WGAN-GP critic.
    spectral_norm divides every weight (convolutions and the class embedding) by its largest
    singular value, estimated by one power iteration per forward pass in training (torch's own
    parametrisation), which bounds how fast D's output can change with its input.

    classifier > 0 adds a linear head that names the class from the last features, averaged
    over positions and normalised per image (layer norm without parameters): the same head as
    the VAE-GAN's patch discriminator, where a head without the normalisation learned the rare
    classes far worse. forward(..., named=True) returns (logits (B,), class logits (B, classifier)).

    mbstd > 0 gives the last layer one more input channel, constant over positions: the standard
    deviation of the features over each group of mbstd consecutive images, averaged to one number
    per group (its diversity), the same for every image of the group (group_spread).
    forward(..., sets=2) says that the batch is two sets of equal size one after the other (real,
    then generated images), so that no group mixes them; a group is the largest divisor of the
    set's size not above mbstd.
    """

    def __init__(self, ndf: int = 64, nc: int = 3, image_size: int = 64, num_classes: int = 0,
                 norm: str = "batch", spectral_norm: bool = False, classifier: int = 0, mbstd: int = 0):
        super().__init__()
        start, n = _stack(image_size)
        # (B, nc, S, S) -> (B, ndf, S/2, S/2); no normalisation on the input layer (Radford et al.)
        layers = [nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        width = ndf
        for _ in range(n - 1):  # each block doubles the width and halves the resolution
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=norm == "none"),
                       _norm(norm, width * 2), nn.LeakyReLU(0.2, inplace=True)]
            width *= 2
        self.features = nn.Sequential(*layers)  # (B, ndf * 2**(n-1), start, start)
        self.mbstd = mbstd
        self.out = nn.Conv2d(width + (mbstd > 0), 1, start, 1, 0, bias=False)  # (B, 1, 1, 1)
        self.embed = nn.Embedding(num_classes, width) if num_classes else None
        self.classifier = nn.Linear(width, classifier) if classifier else None  # torch's init, no spectral norm
        self.apply(init_dcgan_weights)
        if spectral_norm:
            for m in list(self.modules()):
                if isinstance(m, (nn.Conv2d, nn.Embedding)):
                    nn.utils.parametrizations.spectral_norm(m)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, named: bool = False, sets: int = 1):
        h = self.features(x)
        if self.mbstd:  # the last input channel of `out` reads the group spread, the same at every position
            w = self.out.weight
            logits = F.conv2d(h, w[:, :-1]).flatten() + group_spread(h, self.mbstd, sets) * w[:, -1].sum()
        else:
            logits = self.out(h).flatten()
        if self.embed is not None:  # projection: (B, C) . (B, C) summed over C
            logits = logits + (self.embed(y) * h.sum((2, 3))).sum(1)
        if not named:
            return logits
        pooled = h.mean((2, 3))
        return logits, self.classifier(F.layer_norm(pooled, pooled.shape[1:]))


def group_spread(h: torch.Tensor, group: int, sets: int = 1) -> torch.Tensor:
    """(B, C, H, W) -> (B,): the standard deviation of h over each group of consecutive images,
    averaged over channels and positions, given to every image of the group (Karras et al. 2018).
    The group is the largest divisor of B / sets not above `group`, so groups never cross from
    one set to the next. D reads it as one more input channel of its last layer, constant over
    positions, which is the same as adding it times the sum of that channel's kernel: computed
    that way, the last convolution keeps its fast, even channel count."""
    b, c, height, width = h.shape
    g = max(d for d in range(1, min(group, b // sets) + 1) if (b // sets) % d == 0)
    # (groups, g, values) with each image's values in its memory order (channels-last: a view)
    x = h.float().permute(0, 2, 3, 1).reshape(b // g, g, height * width * c)
    # the variance written out: torch's var over a channels-last batch is many times slower
    std = (x - x.mean(1, keepdim=True)).square().mean(1).add(1e-8).sqrt().mean(1)
    return std.repeat_interleave(g).to(h.dtype)


def discriminator_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """D's loss from its logits on real and generated images (the penalty is added separately).
    Computed in fp32 whatever precision the logits came in."""
    real, fake = real.float(), fake.float()
    if kind == "bce":  # -log D(x) - log(1 - D(G(z))), with D = sigmoid(logit)
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "hinge":  # Lim & Ye 2017
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "wgan-gp":  # the negated Wasserstein estimate (Arjovsky et al. 2017)
        return fake.mean() - real.mean()
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def generator_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """G's loss from D's logits on generated images; for bce the non-saturating -log D(G(z))."""
    fake = fake.float()
    return F.softplus(-fake).mean() if kind == "bce" else -fake.mean()


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     y: torch.Tensor | None = None, mix: torch.Tensor | None = None) -> torch.Tensor:
    """Gulrajani et al. 2017, eq. 3: E[(||grad_x D(x_hat)||_2 - 1)^2] at random interpolates
    x_hat = mix * real + (1 - mix) * fake, mix (B, 1, 1, 1) ~ U[0, 1] per image (drawn here unless given).

    The inner gradient is taken with autograd.grad(create_graph=True) and the caller runs one
    ordinary backward() of its loss: that is the pattern DistributedDataParallel supports
    (pytorch/pytorch#63812), since the per-image gradients never reach DDP's all-reduce hooks
    and the final backward() carries the penalty's gradients to them like any other term."""
    if mix is None:
        mix = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    grad = input_gradient(critic, mix * real + (1 - mix) * fake, y)
    return ((grad.float().flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def input_gradient(D: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """d sum(D(x)) / dx, per image, kept in the graph (create_graph) so that a penalty on it
    trains D's weights."""
    x = x.detach().requires_grad_(True)
    out = D(x, y) if y is not None else D(x)
    return torch.autograd.grad(out.sum(), x, create_graph=True)[0]


def r1_penalty(D: nn.Module, real: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Mescheder et al. 2018, eq. 9 without its gamma / 2: E[||grad_x D(x)||^2] over real
    images x, which keeps D flat on the data, where it would otherwise sharpen without end. The
    caller weights it and runs one backward() of its loss (as for gradient_penalty)."""
    return input_gradient(D, real, y).float().pow(2).flatten(1).sum(1).mean()


class LeCamAnchors(nn.Module):
    """LeCam regularisation (Tseng et al. 2021, eq. 3): D's logits on real images are pulled
    towards the running mean of its logits on generated ones, and the other way round, which
    keeps D from pushing the two apart without bound on a small training set. As in the
    authors' code, a term counts only where the logit lies beyond the other side's mean:
    E[relu(D(x) - a_fake)^2] + E[relu(a_real - D(G(z)))^2]. The two running means are buffers,
    so they are saved and resumed with the run."""

    def __init__(self, decay: float = 0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("real", torch.zeros(()))
        self.register_buffer("fake", torch.zeros(()))

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor, batch_mean=torch.mean) -> torch.Tensor:
        """Update the running means with this batch's (batch_mean: over all processes under
        torchrun), then return the penalty."""
        with torch.no_grad():
            self.real.lerp_(batch_mean(logits_real.float()), 1 - self.decay)
            self.fake.lerp_(batch_mean(logits_fake.float()), 1 - self.decay)
        return (F.relu(logits_real.float() - self.fake).pow(2).mean()
                + F.relu(self.real - logits_fake.float()).pow(2).mean())


def build(settings: dict, data) -> dict[str, nn.Module]:
    """The networks a run's settings (its config.json, a checkpoint's args) describe, by the names
    its checkpoint gives them, for `data` (a data.Dataset: its size, channels and classes, which
    condition them when the run was --conditional): G and D, G's moving average where --ema is on,
    and LeCam's running means where --lecam is."""
    classes = data.num_classes if settings["conditional"] else 0
    G = Generator(settings["latent_dim"], settings["ngf"], data.channels, data.size, num_classes=classes,
                  labels=settings["g_labels"])
    D = Discriminator(settings["ndf"], data.channels, data.size, num_classes=classes,
                      norm=settings["d_norm"], spectral_norm=settings["spectral_norm"],
                      classifier=data.num_classes if settings["class_loss"] else 0, mbstd=settings["mbstd"])
    networks = {"G": G, "D": D}
    if settings["ema"]:
        networks["G_ema"] = copy.deepcopy(G).eval().requires_grad_(False)
    if settings["lecam"]:
        networks["lecam"] = LeCamAnchors()
    return networks


# ---------------------------------------------------------------------------------------------
# The drawn generator: a moving average of G's weights, with BatchNorm statistics of its own


def ema_decay(decay: float, updates: int) -> float:
    """The decay for update number `updates` (0-based), warmed up as min(decay, (1 + t) / (10 + t))
    (TensorFlow's ExponentialMovingAverage): early on the average follows the model instead of
    keeping the random initial weights (0.999 ** 2000 still leaves 14 % of them)."""
    return min(decay, (1 + updates) / (10 + updates))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for the weights and the floating-point buffers
    (BatchNorm running statistics); integer buffers (batch counters) are copied."""
    pairs = list(zip(ema.state_dict().values(), model.state_dict().values()))
    floats = [(e, m) for e, m in pairs if e.dtype.is_floating_point]
    torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1.0 - decay)  # one launch, not one per tensor
    for e, m in pairs:
        if not e.dtype.is_floating_point:
            e.copy_(m)


@torch.no_grad()
def recalibrate_batchnorm(module: nn.Module, inputs) -> None:
    """Set every BatchNorm's running statistics to their average over the batches `inputs`
    (argument tuples), computed in training mode ("precise BatchNorm", Wu & Johnson 2021). A
    generator drawn in eval mode then normalises as it did in training, after a few steps as well
    as after many, and an averaged (EMA) generator gets statistics of its own weights instead of
    the average of the raw generator's. Weights and random state are untouched."""
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        return
    momenta, was_training = [m.momentum for m in norms], module.training
    module.train()
    for k, args in enumerate(inputs, 1):
        for m in norms:
            m.momentum = 1.0 / k  # running <- running + (batch - running) / k: the mean over k batches
        module(*args)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    module.train(was_training)
