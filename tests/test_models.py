"""Every configurable model builds for grey and colour inputs of the supported sizes, exposes `features` and
`head` for fine-tuning, and trains under bf16 autocast on the CPU; fp16 is refused off-GPU with a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import mpirun, train_args, train_config
from hpcdl.loop import autocast_context
from hpcdl.models import MODEL_NAMES, AdaptiveAvgPool2dSkippingIdentity, build_model, replace_head, set_backbone_trainable


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (1, 16)])
def test_model_maps_a_batch_to_class_logits(name, channels, size):
    model = build_model(name, in_channels=channels, image_size=size, num_classes=7).eval()
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 7)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_head_swap_and_freezing_touch_only_what_fine_tuning_needs(name):
    model = replace_head(build_model(name, in_channels=1, image_size=28, num_classes=10), 4)
    set_backbone_trainable(model, False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 4)


def _textbook_order(model: nn.Module) -> nn.Module:
    """The same modules (the same weights) in the textbook order: each ReLU before the max-pool it follows here, and
    a plain adaptive pool."""
    layers = list(model.features)
    pairs = [i for i in range(len(layers) - 1) if isinstance(layers[i], nn.MaxPool2d) and isinstance(layers[i + 1], nn.ReLU)]
    assert len(pairs) == 2, "both models pool before the ReLU that ends each convolution block"
    for i in pairs:
        layers[i], layers[i + 1] = layers[i + 1], layers[i]
    layers = [nn.AdaptiveAvgPool2d(layer.output_size) if isinstance(layer, AdaptiveAvgPool2dSkippingIdentity) else layer for layer in layers]
    return nn.Sequential(nn.Sequential(*layers), model.head)


@pytest.mark.parametrize("size", [28, 32, 16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("name", ["lenet5", "cnn"])
def test_convolution_blocks_compute_the_textbook_function_and_gradients_exactly(name, size, memory_format):
    """LeNet-5 and SmallCNN max-pool before the ReLU that ends each convolution block, and LeNet-5 skips an
    adaptive pool that would average 1x1 windows (28x28 inputs): both are there for speed only, so losses and
    gradients must be the textbook order's, bit for bit, or training would silently follow another curve (and the
    bench would compare different maths). Training mode: batch norm's batch statistics, dropout's mask (seeded)."""
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, image_size=size, num_classes=10).to(memory_format=memory_format)
    x = torch.randn(64, 1, size, size).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (64,))
    results = []
    for variant in (model, _textbook_order(model)):
        variant.zero_grad()
        torch.manual_seed(1)
        loss = torch.nn.functional.cross_entropy(variant(x), y)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss, grads), (textbook_loss, textbook_grads) = results
    assert torch.equal(loss, textbook_loss)
    assert all(torch.equal(g, t) for g, t in zip(grads, textbook_grads, strict=True))
    assert any(g.abs().sum() > 0 for g in grads)


def test_fp16_off_gpu_is_refused_by_name():
    with pytest.raises(ValueError, match="train.precision: fp16 needs a GPU"):
        autocast_context("fp16", torch.device("cpu"))


def test_bf16_training_runs_and_learns(data_copy, tmp_path):
    mpirun(1, "hpcdl.train", train_args(tmp_path, data_copy, tmp_path / "out", train_config(ranks=1, epochs=3, precision="bf16", augment=[])))
    history = json.loads((tmp_path / "out" / "metrics.json").read_text())["history"]
    assert history[-1]["loss"] < history[0]["loss"]


class _Stop(Exception):
    """Raised by the probe once it has seen where the inputs went."""


def _model_on_another_device(seen: list):
    """A model whose weights live on the `meta` device, standing in for a GPU on this CPU-only machine: a forward
    pre-hook records the device of the inputs it is given, then stops the evaluation."""
    model = build_model("lenet5", in_channels=1, image_size=16, num_classes=10).to("meta")

    def probe(module, args):
        seen.append(args[0].device)
        raise _Stop

    model.register_forward_pre_hook(probe)
    return model


def test_evaluation_after_training_feeds_inputs_to_the_models_device(digits_dir, tmp_path):
    """After training on a GPU the model is still there: train's final validation and the test-set evaluation of
    evaluate and finetune must send their inputs to the model's device (they once sent them to the CPU)."""
    from hpcdl import train
    from hpcdl.evaluate import evaluate_model
    from hpcdl.stage_runtime import load_data

    manifest, splits, normalise = load_data(digits_dir)
    seen: list = []
    with pytest.raises(_Stop):
        train.finish(_model_on_another_device(seen), train_config(), manifest, splits, normalise, [], tmp_path, run=None)
    with pytest.raises(_Stop):
        evaluate_model(_model_on_another_device(seen), manifest, splits, normalise, tmp_path, title="probe")
    assert seen == [torch.device("meta")] * 2
