"""The cheap scores that --eval-every logs during training, against the test split: KID, and the
SWD of patches per scale (evaluation/patches.py), which needs no network."""
import torch

from data import Dataset, as_tensor, load
from evaluation.distances import class_shares, kid, proportional_labels
from evaluation.features import feature_network, predict
from evaluation.patches import Reference
from system import errors
from utils.sampling import draw, fixed_noise

PANELS = [("KID against the test split", ["kid"], 0.0),  # for pictures.plot_curves
          ("SWD against the test split, mean of scales", ["swd_mean"], 0.0)]


class KIDProbe:
    """KID and SWD of a generator's samples against the test split, for --eval-every in the training
    scripts. The feature network and the test features are computed once; each call draws
    --eval-n images from fixed latents (the same every time, without touching the run's RNG)."""

    def __init__(self, args, data: Dataset, latent_dim: int, device: torch.device):
        self.every, self.epochs = args.eval_every, args.epochs
        splits = load(data, args.data_root, splits=("train", "test"))
        if len(splits["test"]) < 2:
            raise errors.UserError(f"--eval-every needs at least 2 test images; the data file's test split "
                                   f"has {len(splits['test'])}")
        self.model, _ = feature_network(data, args.data_root, device, args.feature_cache)
        self.real = predict(self.model, splits["test"].images)[0]
        self.patches = Reference(as_tensor(splits["test"].images), args.seed)
        self.z = fixed_noise(args.eval_n, latent_dim, args.seed + 1, device)
        # labels in the training shares: what conditional models and the VAE's class mixture draw
        # (a multi-label set has neither)
        self.y = None if data.multi_label else proportional_labels(
            args.eval_n, class_shares(splits["train"].labels, data.num_classes), args.seed).to(device)

    def due(self, epoch: int) -> bool:
        """After `epoch` (counted from 1) epochs?"""
        return epoch % self.every == 0 or epoch == self.epochs

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """KID of the drawing network `model` (a GAN's G, a VAE), its mean and std over subsets, and
        the SWD per scale and its mean."""
        images = draw(model, self.z, self.y, batch_size=250, uint8=True)
        mean, std = kid(predict(self.model, images)[0], self.real, subsets=50)
        return {"kid": mean, "kid_std": std, **self.patches.scores(images.cpu())}
