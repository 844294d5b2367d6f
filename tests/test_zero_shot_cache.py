"""CLIP zero-shot heads: the pretrained text tower is loaded once per evaluation, each head is computed once and
cached on disk by content (text checkpoint, class names, templates, dtype), and equals a direct computation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from mergelab.evaluation.api import evaluate
from mergelab.evaluation.zero_shot import HEADS_FOLDER, ZeroShotHeads
from mergelab.models import vision
from tests.test_image_eval import tiny_clip_folder, write_task

PETS = ("cat", "dog", "fish")
SKY = ("sun", "moon", "star")
TEMPLATES = ("a photo of a {}.", "a drawing of a {}")


@pytest.fixture
def counted(monkeypatch):
    """Counts of text-tower loads and zero-shot head computations (wrapping the real ones)."""
    counts = {"loads": 0, "heads": 0}
    load, weights = vision.load_clip_text, vision.zero_shot_weights

    def counting_load(*args, **kwargs):
        counts["loads"] += 1
        return load(*args, **kwargs)

    def counting_weights(*args, **kwargs):
        counts["heads"] += 1
        return weights(*args, **kwargs)

    monkeypatch.setattr(vision, "load_clip_text", counting_load)
    monkeypatch.setattr(vision, "zero_shot_weights", counting_weights)
    return counts


def direct_weights(folder, names, templates) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return vision.zero_shot_weights(vision.load_clip(folder), tokenizer, list(names), templates)


def test_a_second_evaluation_loads_no_text_tower_and_computes_no_head(tmp_path, counted):
    clip, _ = tiny_clip_folder(tmp_path / "clip")
    data = {"pets": write_task(tmp_path / "pets", per_class=2, classes=PETS),
            "sky": write_task(tmp_path / "sky", per_class=2, classes=SKY)}  # fmt: skip
    kwargs = dict(protocols=["current"], num_seeds=1, cache_dir=tmp_path / "cache", progress=False,
                  zero_shot_text=clip, templates=TEMPLATES)  # fmt: skip
    first = evaluate(clip, {"pets": clip, "sky": clip}, data, **kwargs)
    assert counted == {"loads": 1, "heads": 2}  # the pretrained CLIP once for both tasks, one head per task
    second = evaluate(clip, {"pets": clip, "sky": clip}, data, **kwargs)
    assert counted == {"loads": 1, "heads": 2}  # nothing loaded or computed again
    assert [r.accuracy for r in first] == [r.accuracy for r in second]
    assert len(list((tmp_path / "cache" / HEADS_FOLDER).glob("*.safetensors"))) == 2


def test_the_cached_head_equals_a_direct_computation(tmp_path):
    clip, _ = tiny_clip_folder(tmp_path / "clip")
    direct = direct_weights(clip, PETS, TEMPLATES)
    built = ZeroShotHeads(tmp_path / "heads", clip, TEMPLATES)
    assert torch.allclose(built.weights(clip, PETS), direct, rtol=0, atol=1e-6)
    read = ZeroShotHeads(tmp_path / "heads", clip, TEMPLATES)
    cached = read.weights(clip, PETS)
    assert (read.hits, read.computed, read.loaded) == (1, 0, 0)
    assert cached.dtype == torch.float32 and torch.allclose(cached, direct, rtol=0, atol=1e-6)
    model = read.task_model(clip, PETS)  # the head a task model gets is the cached one
    assert torch.equal(model.head.weight, cached) and model.label_names == list(PETS)


def test_the_key_is_the_text_checkpoint_the_class_names_and_the_templates(tmp_path):
    clip, _ = tiny_clip_folder(tmp_path / "clip")
    heads = ZeroShotHeads(tmp_path / "heads", clip, TEMPLATES)
    heads.weights(clip, PETS)
    heads.weights(clip, PETS[::-1])  # another class order: another head
    ZeroShotHeads(tmp_path / "heads", clip, TEMPLATES[:1]).weights(clip, PETS)  # other templates
    assert heads.computed == 2 and heads.loaded == 1
    assert len(list((tmp_path / "heads").glob("*.safetensors"))) == 3
    other, _ = tiny_clip_folder(tmp_path / "other")  # the same architecture, other weights: another head
    with torch.no_grad():
        model = vision.load_clip(other)
        model.logit_scale.add_(1.0)
        model.save_pretrained(other)
    scaled = ZeroShotHeads(tmp_path / "heads", other, TEMPLATES)
    assert torch.allclose(scaled.weights(clip, PETS), heads.weights(clip, PETS) * torch.e, rtol=1e-5)
    assert scaled.computed == 1


def test_without_a_text_source_each_model_uses_its_own_tower(tmp_path, counted):
    clip, _ = tiny_clip_folder(tmp_path / "clip")
    heads = ZeroShotHeads(tmp_path / "heads")
    heads.task_model(clip, PETS)
    heads.task_model(clip, SKY)
    assert (counted["loads"], heads.computed, heads.loaded) == (1, 2, 1)
    assert torch.allclose(heads.weights(clip, SKY), direct_weights(clip, SKY, vision.DEFAULT_TEMPLATES), atol=1e-6)


def test_a_corrupt_cache_file_is_recomputed(tmp_path):
    clip, _ = tiny_clip_folder(tmp_path / "clip")
    ZeroShotHeads(tmp_path / "heads", clip).weights(clip, PETS)
    (file,) = (tmp_path / "heads").glob("*.safetensors")
    file.write_bytes(b"not a safetensors file")
    heads = ZeroShotHeads(tmp_path / "heads", clip)
    with pytest.warns(UserWarning, match="unreadable"):
        weights = heads.weights(clip, PETS)
    assert heads.computed == 1 and torch.allclose(weights, direct_weights(clip, PETS, vision.DEFAULT_TEMPLATES), atol=1e-6)


def test_a_template_without_a_slot_is_one_line(tmp_path):
    from mergelab.core.errors import ConfigError

    with pytest.raises(ConfigError, match="must contain"):
        ZeroShotHeads(tmp_path / "heads", None, ("a photo",))
