"""A small classifier whose penultimate layer is evaluate.py's feature space.

FID computed with ImageNet Inception weights measures what ImageNet cares about; this network is
trained on the dataset itself (blood cells for BloodMNIST), so its features separate its classes.
Five conv-BN-ReLU stages, each but the last followed by 2x2 max pooling, then global average
pooling, which takes any image size and channel count:

    (B, 3, 64, 64) -> 32 @ 64 -> 64 @ 32 -> 128 @ 16 -> 256 @ 8 -> 256 @ 4 -> mean -> (B, 256)
"""
import torch
import torch.nn as nn


class Classifier(nn.Module):
    def __init__(self, num_classes: int = 8, nc: int = 3, widths: tuple[int, ...] = (32, 64, 128, 256, 256)):
        super().__init__()
        layers, c_in = [], nc
        for i, c_out in enumerate(widths):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # He et al. 2015 for ReLU networks
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1], (B, 3, H, W) -> (B, widths[-1]), the space FID/KID/precision are taken in."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

