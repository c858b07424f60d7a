"""The convolutional autoencoder of rule `autoencode` (src/hpcdl/autoencode.py). Its encoder is exactly the
`features` of a classifier from hpcdl.models (same module, same parameter names), so fine-tuning
(finetune.init: autoencoder) can copy the encoder's weights into a classifier of the same architecture and add
a fresh head. The decoder maps the feature vector back to an image: a Linear layer to a 64-channel map of a
quarter of the image size, then two stride-2 transposed convolutions. Its output is in the normalised pixel
space of the inputs (no squashing), which is what the reconstruction loss compares against."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from hpcdl.models import build_model

MODEL_KIND = "autoencoder"  # the model file's `kind` (hpcdl.stage_runtime.load_model_file rebuilds it)


class ConvAutoencoder(nn.Module):
    """`features`: the encoder, a classifier's features (arch from hpcdl.models.MODEL_NAMES); `decoder`: back to
    (in_channels, image_size, image_size)."""

    def __init__(self, arch: str, in_channels: int, image_size: int):
        super().__init__()
        classifier = build_model(arch, in_channels=in_channels, image_size=image_size, num_classes=1)
        self.features = classifier.features
        width = classifier.head.in_features  # every classifier's head is a Linear on its features
        self.image_size = image_size
        self.seed_size = math.ceil(image_size / 4)  # two stride-2 upsamplings reach at least image_size
        self.decoder = nn.Sequential(
            nn.Linear(width, 64 * self.seed_size * self.seed_size),
            nn.ReLU(inplace=True),
            nn.Unflatten(1, (64, self.seed_size, self.seed_size)),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(32, in_channels, 4, stride=2, padding=1),
        )

    def forward(self, x):
        out = self.decoder(self.features(x))
        if out.shape[-1] != self.image_size:  # sizes that are not a multiple of 4
            out = F.interpolate(out, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return out


def classifier_from_encoder(autoencoder: ConvAutoencoder, arch: str, *, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """A classifier of the autoencoder's architecture whose `features` hold the encoder's weights and whose
    `head` is new (drawn from the current torch seed)."""
    model = build_model(arch, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    model.features.load_state_dict(autoencoder.features.state_dict())
    return model
