"""Image classifiers and CLIP split into encoder + head: ``head(encoder(x))`` is the model's own output."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import (
    BertTokenizerFast,
    CLIPImageProcessor,
    CLIPModel,
    ConvNextConfig,
    ConvNextForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from mergelab.core.errors import CheckpointError, ConfigError
from mergelab.models.vision import (
    ImageEncoder,
    clip_image_encoder,
    encode_images,
    split_image_classifier,
    zero_shot_head,
    zero_shot_weights,
)
from tests._text_helpers import tiny_clip_config, write_tokenizer


def tiny_vit(num_labels: int = 3) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=32,
                       patch_size=8, num_labels=num_labels)  # fmt: skip
    return ViTForImageClassification(config).eval()


def tiny_convnext(num_labels: int = 4) -> ConvNextForImageClassification:
    torch.manual_seed(1)
    config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=num_labels, image_size=32)
    return ConvNextForImageClassification(config).eval()


def images(count: int, size: int = 40, seed: int = 0) -> list[Image.Image]:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (count, size, size, 3), generator=generator, dtype=torch.uint8).numpy()
    return [Image.fromarray(p) for p in pixels]


@pytest.mark.parametrize("build, pooling", [(tiny_vit, "cls"), (tiny_convnext, "pooler")])
def test_image_classifier_features_through_the_head_are_its_logits(build, pooling):
    model = build()
    encoder, head = split_image_classifier(model)
    assert encoder.pooling == pooling and head is model.classifier
    pixels = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(head(encoder(pixels)), model(pixel_values=pixels).logits, atol=1e-6)


def test_images_go_through_the_models_own_processor():
    model = tiny_vit()
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    encoder, head = split_image_classifier(model, processor)
    batch = images(5)
    features = encode_images(encoder, processor, batch, batch_size=2)
    own = model(**processor(images=batch, return_tensors="pt")).logits
    assert features.shape == (5, 32) and features.dtype == torch.float32
    assert torch.allclose(head(features), own, atol=1e-5)


def test_an_image_classifier_no_rule_fits_is_refused_naming_from_modules():
    model = tiny_vit()
    model.classifier = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 3))
    original = model.forward

    def forward(pixel_values):  # a head reading something no rule gives (the second token)
        out = model.vit(pixel_values=pixel_values).last_hidden_state[:, 1]
        return type(original(pixel_values=pixel_values))(logits=model.classifier(out))

    model.forward = forward
    with pytest.raises(CheckpointError, match="cannot split a 'vit' image classifier .*TaskModel.from_modules"):
        split_image_classifier(model)
    with pytest.raises(ConfigError, match="unknown image feature 'avg'"):
        ImageEncoder(model.vit, "avg")


@pytest.fixture
def tiny_clip(tmp_path):
    tokenizer: BertTokenizerFast = write_tokenizer(tmp_path)
    torch.manual_seed(2)
    config = tiny_clip_config(tokenizer)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(config).eval(), tokenizer, processor


def test_clip_zero_shot_head_gives_clips_own_zero_shot_logits(tiny_clip):
    clip, tokenizer, processor = tiny_clip
    names = ["cat", "dog", "red car"]
    weights = zero_shot_weights(clip, tokenizer, names, templates=("a photo of a {}.",))
    head, encoder = zero_shot_head(weights), clip_image_encoder(clip, processor)
    batch = images(4)
    pixels = processor(images=batch, return_tensors="pt")["pixel_values"]
    text = tokenizer([f"a photo of a {n}." for n in names], padding=True, return_tensors="pt")
    with torch.no_grad():
        own = clip(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
        ours = head(encoder(pixels))
    assert torch.allclose(ours, own.logits_per_image, atol=1e-4)
    assert torch.allclose(head(encode_images(encoder, processor, batch, batch_size=3)), ours, atol=1e-5)


def test_zero_shot_head_averages_templates_then_normalises(tiny_clip):
    clip, tokenizer, _ = tiny_clip
    templates = ("a photo of a {}.", "{} in the wild", "a drawing of a {}")
    weights = zero_shot_weights(clip, tokenizer, ["cat"], templates)
    with torch.no_grad():
        per_template = [zero_shot_weights(clip, tokenizer, ["cat"], (t,))[0] for t in templates]
    mean = torch.stack(per_template).mean(0)
    scale = clip.logit_scale.exp()
    assert torch.allclose(weights[0], mean / mean.norm() * scale, atol=1e-5)
    assert torch.allclose(weights[0].norm(), scale, atol=1e-4)
    with pytest.raises(ConfigError, match="must contain '\\{\\}'"):
        zero_shot_weights(clip, tokenizer, ["cat"], ("a photo",))
    with pytest.raises(ConfigError, match="at least one class name"):
        zero_shot_weights(clip, tokenizer, [])
