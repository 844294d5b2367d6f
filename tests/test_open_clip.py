"""open_clip checkpoints behind a guarded import: without the package a one-line ConfigError names the install
command (this runs everywhere); with it, a tiny open_clip model evaluates like its own zero-shot classifier."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.core.errors import ConfigError
from mergelab.models import open_clip as oc
from tests.test_image_eval import write_task

PETS = ("cat", "dog", "fish")
TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}  # fmt: skip


def fake_folder(folder):
    """An open_clip folder layout (config + weights) that needs open_clip to load."""
    folder.mkdir(parents=True)
    (folder / oc.OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {}}))
    save_file({"logit_scale": torch.zeros(())}, str(folder / "open_clip_model.safetensors"))
    return folder


def test_a_missing_open_clip_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip now raises ImportError
    with pytest.raises(ConfigError) as info:
        oc.require_open_clip()
    message = str(info.value)
    assert "pip install open_clip_torch" in message and "torchvision" in message and "\n" not in message


def test_a_broken_torchvision_inside_open_clip_is_one_line(monkeypatch):
    def failing(name):
        raise RuntimeError("operator torchvision::nms does not exist\n(a long traceback line)")

    monkeypatch.setattr(oc.importlib, "import_module", failing)
    with pytest.raises(ConfigError) as info:
        oc.load_open_clip_text("anywhere")
    assert "torchvision::nms" in str(info.value) and "\n" not in str(info.value)


def test_eval_of_an_open_clip_folder_without_the_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    data = write_task(tmp_path / "pets", per_class=2, classes=PETS)
    folder = fake_folder(tmp_path / "oc")
    result = CliRunner().invoke(app, ["eval", "--merged", str(folder), "--finetuned", f"pets={folder}",
                                      "--data", f"pets={data}", "--cache-dir", str(tmp_path / "c")])  # fmt: skip
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install open_clip_torch" in lines[0], result.output


def tiny_open_clip(folder):
    """A tiny random open_clip model saved as an open_clip folder (open_clip's hub layout)."""
    model_module = pytest.importorskip("open_clip.model")
    folder.mkdir(parents=True)
    (folder / oc.OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = model_module.CLIP(**TINY)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def test_open_clip_current_eval_is_its_own_zero_shot_accuracy(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    folder = tiny_open_clip(tmp_path / "oc")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    data = write_task(tmp_path / "pets", per_class=3, classes=PETS)
    from mergelab.data.images import load_image_task

    test = load_image_task("pets", data).splits["test"]
    with torch.no_grad():
        images = model.encode_image(torch.stack([preprocess(i) for i in test.images(0, len(test))]), normalize=True)
        text = model.encode_text(tokenizer([f"a photo of a {n}." for n in PETS]), normalize=True)
        own = (images @ text.T).argmax(1)
    expected = float((own == torch.tensor(test.labels)).float().mean())
    from mergelab.evaluation.api import evaluate

    rows = evaluate(folder, {"pets": folder}, {"pets": data}, protocols=["current", "knn"], shots=[1], num_seeds=1,
                    cache_dir=tmp_path / "cache", progress=False)  # fmt: skip
    assert next(r for r in rows if r.protocol == "current").accuracy == pytest.approx(expected)
    assert (tmp_path / "cache" / "zero_shot_heads").is_dir()
