"""`mergelab eval` on HF image classifiers with image-folder tasks: Current Eval of a fine-tuned model is its own
accuracy computed with transformers, and every feature-based protocol runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextImageProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.data.images import load_image_task
from tests._text_helpers import tiny_clip_config

CLASSES = ("circle", "square", "stripe")


def write_task(root, per_class: int = 6, classes=CLASSES):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            for i in range(per_class):
                pixels = rng.integers(0, 60, (36, 36, 3), dtype=np.uint8)
                pixels[:, :, c] += 150  # a colour cue per class
                path = root / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
    return root


def vit(folder):
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=32,
                       patch_size=8, num_labels=3, id2label=dict(enumerate(CLASSES)),
                       label2id={n: i for i, n in enumerate(CLASSES)})  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def convnext(folder):
    torch.manual_seed(1)
    config = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3, image_size=32,
                            id2label=dict(enumerate(CLASSES)), label2id={n: i for i, n in enumerate(CLASSES)})  # fmt: skip
    ConvNextForImageClassification(config).save_pretrained(folder)
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(folder)
    return folder


def own_predictions(folder, model_class, processor_class, images) -> list[int]:
    model = model_class.from_pretrained(folder).eval()
    processor = processor_class.from_pretrained(folder)
    with torch.no_grad():
        return model(**processor(images=images, return_tensors="pt")).logits.argmax(1).tolist()


def relabel_test_by(data, predictions: list[int], classes=CLASSES) -> None:
    """Move each test image into the class folder the model predicts: its own test accuracy is then exactly 1."""
    split = load_image_task("shapes", data).splits["test"]
    staged = data / "staged"
    for index, (path, predicted) in enumerate(zip(split.sources, predictions, strict=True)):
        target = staged / classes[predicted] / f"{index}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
    for folder in (data / "test").iterdir():
        folder.rmdir()
    (data / "test").rmdir()
    staged.rename(data / "test")


@pytest.mark.parametrize("build, model_class, processor_class", [
    (vit, ViTForImageClassification, ViTImageProcessor),
    (convnext, ConvNextForImageClassification, ConvNextImageProcessor),
])  # fmt: skip
def test_eval_of_an_image_classifier_gives_its_own_accuracy(tmp_path, build, model_class, processor_class):
    data = write_task(tmp_path / "shapes")
    model = build(tmp_path / "ft")
    test = load_image_task("shapes", data).splits["test"]
    predictions = own_predictions(model, model_class, processor_class, test.images(0, len(test)))
    relabel_test_by(data, predictions)
    assert own_predictions(model, model_class, processor_class, load_image_task("shapes", data).splits["test"].images(
        0, len(test))) == sorted(predictions)  # the relabelled split: the model's own accuracy is exactly 1
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(app, [
        "eval", "--merged", str(model), "--finetuned", f"shapes={model}", "--data", f"shapes={data}",
        "--protocol", "current,knn,ft_classifier,linear_probe", "--shots", "2", "--num-seeds", "1",
        "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    current = next(r for r in rows if r["protocol"] == "current")
    assert current["accuracy"] == 1.0 and current["normalized_accuracy"] == 1.0
    assert {r["protocol"] for r in rows} == {"current", "knn", "ft_classifier", "ft_classifier:converged", "linear_probe"}


def test_image_eval_with_a_wrong_label_set_is_one_line(tmp_path):
    data = write_task(tmp_path / "shapes")
    (data / "train" / "circle").rename(data / "train" / "disc")
    (data / "test" / "circle").rename(data / "test" / "disc")
    model = vit(tmp_path / "ft")
    result = CliRunner().invoke(app, ["eval", "--merged", str(model), "--finetuned", f"shapes={model}",
                                      "--data", f"shapes={data}", "--cache-dir", str(tmp_path / "c")])  # fmt: skip
    assert result.exit_code == 1
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output


def tiny_clip_folder(folder):
    from transformers import CLIPImageProcessor, CLIPModel

    from tests._text_helpers import write_tokenizer

    tokenizer = write_tokenizer(folder)
    torch.manual_seed(3)
    config = tiny_clip_config(tokenizer)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder, tokenizer


def clip_zero_shot_predictions(folder, tokenizer, names, images) -> list[int]:
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    pixels = CLIPImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    text = tokenizer([f"a photo of a {n}." for n in names], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels)
    return out.logits_per_image.argmax(1).tolist()


def test_pretrained_clip_current_eval_is_its_zero_shot_accuracy_and_every_protocol_runs(tmp_path):
    pets = ("cat", "dog", "fish")  # words of the tiny tokenizer
    data = write_task(tmp_path / "pets", classes=pets)
    clip, tokenizer = tiny_clip_folder(tmp_path / "clip")
    test = load_image_task("pets", data).splits["test"]
    predictions = clip_zero_shot_predictions(clip, tokenizer, pets, test.images(0, len(test)))
    relabel_test_by(data, predictions, pets)  # CLIP's own zero-shot accuracy on the relabelled split is exactly 1
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(app, [
        "eval", "--merged", str(clip), "--finetuned", f"pets={clip}", "--data", f"pets={data}",
        "--protocol", "current,knn,aligned,ft_classifier,linear_probe,ensemble,surgery", "--shots", "2",
        "--num-seeds", "1", "--transforms", "procrustes", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert next(r for r in rows if r["protocol"] == "current")["accuracy"] == 1.0
    assert {r["protocol"].split(":")[0] for r in rows} >= {"current", "knn", "aligned", "aligned-control",
                                                           "ft_classifier", "linear_probe", "ensemble", "surgery"}
