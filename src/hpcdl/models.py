"""Model zoo of the pipeline. Every model names its classifier `head` so fine-tuning can swap it generically."""

from __future__ import annotations

from torch import nn

MODEL_NAMES = ("mlp", "lenet5", "cnn", "resnet18")
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small")  # finetune.init: torchvision:<arch>


class MLP(nn.Module):
    """Two hidden layers: the smallest sensible baseline."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size * image_size, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, 128),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class AdaptiveAvgPool2dSkippingIdentity(nn.AdaptiveAvgPool2d):
    """An adaptive average pool that hands back an input already of its output size: averaging 1x1 windows is the
    identity, so values and gradients are unchanged, but PyTorch would still run the pool and its backward (about
    5% of a LeNet-5 training step on 28x28 images on the CPU)."""

    def forward(self, x):
        target = self.output_size if isinstance(self.output_size, (tuple, list)) else (self.output_size,) * 2
        if all(want is None or want == have for want, have in zip(target, x.shape[-2:])):
            return x
        return super().forward(x)


class LeNet5(nn.Module):
    """LeCun et al. 1998 with ReLU and max-pooling; adapts to any input size through an adaptive pool.

    Each convolution is followed by max-pooling, then ReLU: the textbook orders them conv, ReLU, pool, but ReLU is
    monotonic, so max and ReLU commute and the function and every gradient are exactly the textbook's
    (tests/test_models.py checks it), while the ReLU and its backward touch a quarter of the elements. The parameter
    names (features.0, features.3, ...) are the textbook order's."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            nn.Conv2d(6, 16, 5),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            AdaptiveAvgPool2dSkippingIdentity(5),
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(84, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class SmallCNN(nn.Module):
    """A VGG-style CNN with batch norm and dropout: stronger than LeNet on harder data (Fashion, CIFAR).

    Each block ends batch norm, max-pool, ReLU: the same function and gradients as the textbook's ReLU then pool
    (as in LeNet5; tests/test_models.py checks it), with the last ReLU on a quarter of the elements. Parameter
    names are unchanged (the swapped modules have none)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int):
        super().__init__()

        def block(cin, cout):
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.MaxPool2d(2),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(in_channels, 32),
            *block(32, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(0.3),
        )
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class ResNet18Small(nn.Module):
    """torchvision's ResNet-18 adapted to small inputs (3x3 stem, stride 1, no max-pool), as for CIFAR."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int):
        super().__init__()
        import torchvision  # here, not at the top: only these models need it (about 2 s of every stage's start)

        net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.head = net.fc
        net.fc = nn.Identity()
        self.features = net

    def forward(self, x):
        return self.head(self.features(x))


class TorchvisionBackbone(nn.Module):
    """An ImageNet torchvision model (for finetune.init=torchvision:<arch>) with its classifier moved to `head`.
    Grey inputs are repeated to the 3 channels the pretrained stem expects."""

    def __init__(self, arch: str, state_dict: dict | None, num_classes: int):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        if state_dict is not None:
            net.load_state_dict(state_dict)
        if hasattr(net, "fc"):
            in_features = net.fc.in_features
            net.fc = nn.Identity()
        else:  # mobilenet: classifier[-1] is the last Linear
            in_features = net.classifier[-1].in_features
            net.classifier[-1] = nn.Identity()
        self.features = net
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, x):
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.head(self.features(x))


_BUILDERS = {"mlp": MLP, "lenet5": LeNet5, "cnn": SmallCNN, "resnet18": ResNet18Small}


def build_model(name: str, *, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"train.model: unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}") from None
    return builder(in_channels, image_size, num_classes)


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """A fresh classifier for the target classes; the backbone (`features`) keeps its pretrained weights."""
    model.head = nn.Linear(model.head.in_features, num_classes)
    return model


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    for p in model.features.parameters():
        p.requires_grad_(trainable)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

