"""PEFT LoRA adapters as merge inputs: the adapted model streamed tensor by tensor equals PEFT's merge_and_unload()."""

from __future__ import annotations

import json
import re
import shutil
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import mergelab
from mergelab.cli import app
from mergelab.core.errors import CheckpointError
from mergelab.io.adapter import AdapterReader
from mergelab.io.reader import open_checkpoint
from tests._hf_helpers import tiny_base, tiny_classifier

peft = pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2Model,
)

runner = CliRunner()
ATTN = ["query", "value"]


def _randomise(model: torch.nn.Module, seed: int, tags: tuple[str, ...] = ()) -> None:
    """PEFT starts B at zero (ΔW = 0): give every adapter tensor (and trained bias, and each name holding one of
    ``tags``) random values, so that ΔW and the saved full tensors matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            trained = param.requires_grad and name.endswith("bias")
            if trained or any(tag in name for tag in ("lora_", "modules_to_save", *tags)):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def make_adapter(base: Path, folder: Path, seed: int = 1, classifier: bool = True, save: dict | None = None,
                 **lora) -> tuple[Path, dict[str, torch.Tensor]]:  # fmt: skip
    """Wrap ``base`` with LoRA, randomise it, save the adapter; return it and PEFT's merged state dict."""
    loader = AutoModelForSequenceClassification if classifier else AutoModel
    model = get_peft_model(loader.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, **lora))
    save = save or {}
    _randomise(model, seed, ("word_embeddings.base_layer",) if save.get("save_embedding_layers") else ())
    model.save_pretrained(folder, **save)
    merged = model.merge_and_unload()
    return folder, {k: v.detach().clone() for k, v in merged.state_dict().items()}


def assert_same_state(actual, expected, atol: float = 1e-6) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        torch.testing.assert_close(actual[name], tensor, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture(scope="module")
def cls_base(tmp_path_factory) -> Path:
    return tiny_classifier("bert", tmp_path_factory.mktemp("cls") / "base")


def set_config(folder: Path, **updates) -> None:
    file = folder / "adapter_config.json"
    config = json.loads(file.read_text())
    config.update(updates)
    file.write_text(json.dumps(config))


# --- (1) task arithmetic at scale 1 on one adapter is the adapted model ---


def test_api_merge_equals_merge_and_unload(cls_base, tmp_path):
    adapter, expected = make_adapter(cls_base, tmp_path / "ad", target_modules=ATTN)
    assert_same_state(mergelab.merge("task_arithmetic", cls_base, [adapter], scale=1.0).state, expected)
    # without a base the adapter's own (local) base_model_name_or_path is the base
    assert_same_state(mergelab.merge("task_arithmetic", None, [adapter], scale=1.0).state, expected)


@pytest.mark.parametrize("with_base", [True, False])
def test_cli_merge_equals_merge_and_unload(cls_base, tmp_path, with_base):
    adapter, expected = make_adapter(cls_base, tmp_path / "ad", target_modules=ATTN)
    out = tmp_path / "merged"
    args = ["merge", "--method", "task_arithmetic", "--model", str(adapter), "--param", "scale=1.0", "--out", str(out)]
    result = runner.invoke(app, args + (["--base", str(cls_base)] if with_base else []))
    assert result.exit_code == 0, result.output
    reader = open_checkpoint(out)
    assert_same_state({k: reader.get(k) for k in reader.keys()}, expected)
    assert (out / "config.json").exists()


# --- (2) fan_in_fan_out, rank/alpha patterns, rsLoRA, modules_to_save, embeddings, lora_bias, .bin, layers ---

VARIANTS = {
    "patterns+modules_to_save+embedding": dict(
        target_modules=["query", "value", "word_embeddings", "dense"], modules_to_save=["classifier"],
        rank_pattern={"value": 2, "layer.1.output.dense": 6}, alpha_pattern={"layer.1.attention.self.query": 3},
    ),
    "rslora": dict(target_modules=ATTN, use_rslora=True, rank_pattern={"layer.0.attention.self.value": 3}),
    "lora_bias+trained_biases": dict(target_modules=["key", "dense"], lora_bias=True, bias="all"),
    "layers_to_transform": dict(target_modules=ATTN, layers_to_transform=[1], layers_pattern="layer"),
    "regex_targets+saved_embeddings": dict(target_modules=r".*\.(query|word_embeddings)", save={"save_embedding_layers": True}),
    "torch_bin": dict(target_modules=ATTN, save={"safe_serialization": False}),
}  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_equal_merge_and_unload(cls_base, tmp_path, variant):
    lora = dict(VARIANTS[variant])
    adapter, expected = make_adapter(cls_base, tmp_path / "ad", save=lora.pop("save", None), **lora)
    reader = open_checkpoint(adapter)
    assert isinstance(reader, AdapterReader) and reader.adapted_names()
    if "modules_to_save" in lora:
        assert {"classifier.weight", "classifier.bias"} <= set(reader.replaced_names())
    merged = mergelab.merge("task_arithmetic", cls_base, [adapter], scale=1.0, exclude=()).state  # heads merge too
    assert_same_state(merged, expected)


def test_fan_in_fan_out_conv1d(tmp_path):
    """GPT-2's Conv1D stores W as (in, out): PEFT transposes B·A; so must we."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    GPT2Model(config).save_pretrained(tmp_path / "gpt2")
    adapter, expected = make_adapter(tmp_path / "gpt2", tmp_path / "ad", classifier=False,
                                     target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)  # fmt: skip
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert_same_state(mergelab.merge("task_arithmetic", tmp_path / "gpt2", [adapter], scale=1.0).state, expected)
    set_config(adapter, fan_in_fan_out=False)  # c_attn's update (32 x 96) then no longer fits (96 x 32)
    with pytest.raises(CheckpointError, match=r"c_attn.*set fan_in_fan_out to True"):
        mergelab.merge("task_arithmetic", tmp_path / "gpt2", [adapter], scale=1.0)


def test_bare_encoder_base_aligns_by_prefix(tmp_path):
    """An adapter trained on a classifier (``bert.*`` + a saved head) over a bare-encoder base (``embeddings.*``)."""
    base = tiny_base(tmp_path / "base")
    adapter, expected = make_adapter(base, tmp_path / "ad", target_modules=ATTN, modules_to_save=["classifier"])
    reader = open_checkpoint(adapter)
    assert set(reader.extra_names()) == {"classifier.weight", "classifier.bias"}  # the head the base lacks
    merged = mergelab.merge("task_arithmetic", base, [adapter], scale=1.0).state
    encoder = {k.removeprefix("bert."): v for k, v in expected.items() if k.startswith("bert.")}
    base_reader = open_checkpoint(base)
    encoder["embeddings.position_ids"] = base_reader.get("embeddings.position_ids")  # the int buffer stays the base's
    assert_same_state(merged, {k: encoder[k] for k in base_reader.keys()})


# --- (3) TIES over adapters equals TIES over their materialised models ---


def test_ties_on_adapters_equals_ties_on_materialised_models(cls_base, tmp_path):
    adapters, fulls = [], []
    for seed, targets in ((1, ["query", "value"]), (2, ["query", "key", "dense"])):
        adapter, state = make_adapter(cls_base, tmp_path / f"ad{seed}", seed=seed, target_modules=targets)
        full = AutoModelForSequenceClassification.from_pretrained(cls_base)
        full.load_state_dict(state)
        full.save_pretrained(tmp_path / f"full{seed}")
        adapters.append(adapter)
        fulls.append(tmp_path / f"full{seed}")
    for params in (dict(density=0.3, scale=1.0), dict(density=0.5, scale=0.7, scope="global")):
        from_adapters = mergelab.merge("ties", cls_base, adapters, **params).state
        assert_same_state(from_adapters, mergelab.merge("ties", cls_base, fulls, **params).state)


def test_in_memory_inputs_are_never_aliased(cls_base, tmp_path):
    """Merge methods work in place on their inputs: an adapter over an in-memory base (or a torch .bin adapter)
    must hand out copies, or the statistics passes of global TIES would see zeroed tensors."""
    first, _ = make_adapter(cls_base, tmp_path / "ad1", seed=1, target_modules=ATTN, modules_to_save=["classifier"],
                            save={"safe_serialization": False})  # fmt: skip
    second, _ = make_adapter(cls_base, tmp_path / "ad2", seed=2, target_modules=["key"])
    params = dict(density=0.4, scale=1.0, scope="global", exclude=())
    expected = mergelab.merge("ties", cls_base, [first, second], **params).state
    in_memory = load_file(str(cls_base / "model.safetensors"))
    assert_same_state(mergelab.merge("ties", in_memory, [first, second], **params).state, expected)


# --- (4) DoRA and non-LoRA adapters are refused ---


def test_dora_is_refused(cls_base, tmp_path):
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(cls_base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, use_dora=True))  # fmt: skip
    model.save_pretrained(tmp_path / "dora")
    with pytest.raises(CheckpointError, match=r"DoRA \(use_dora\) adapter; only plain LoRA adapters are supported"):
        mergelab.merge("task_arithmetic", cls_base, [tmp_path / "dora"], scale=1.0)


def test_non_lora_adapter_is_refused(cls_base, tmp_path):
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(cls_base),
                           IA3Config(target_modules=["key", "value"], feedforward_modules=[]))  # fmt: skip
    model.save_pretrained(tmp_path / "ia3")
    with pytest.raises(
        CheckpointError, match=r"is a PEFT adapter of type IA3; only LoRA adapters \(peft_type LORA\) are supported"
    ):
        mergelab.merge("task_arithmetic", cls_base, [tmp_path / "ia3"], scale=1.0)
    result = runner.invoke(app, ["merge", "--method", "task_arithmetic", "--base", str(cls_base), "--model",
                                 str(tmp_path / "ia3"), "--out", str(tmp_path / "out")])  # fmt: skip
    assert result.exit_code == 1 and "type IA3" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


# --- (5) the wrong base is refused ---


def test_base_differing_from_base_model_name_or_path_is_refused(cls_base, tmp_path):
    adapter, expected = make_adapter(cls_base, tmp_path / "ad", target_modules=ATTN)
    other = tiny_classifier("bert", tmp_path / "other", seed=7)
    with pytest.raises(
        CheckpointError,
        match=rf"trained on {re.escape(str(cls_base.resolve()))}.*base given is "
        rf"{re.escape(str(other.resolve()))}",
    ):
        mergelab.merge("task_arithmetic", other, [adapter], scale=1.0)
    copy = Path(shutil.copytree(cls_base, tmp_path / "copy"))  # same content elsewhere: accepted
    assert_same_state(mergelab.merge("task_arithmetic", copy, [adapter], scale=1.0).state, expected)


def test_mismatched_shapes_or_modules_are_refused(cls_base, tmp_path):
    adapter, _ = make_adapter(cls_base, tmp_path / "ad", target_modules=ATTN)
    set_config(adapter, base_model_name_or_path="some-org/not-here")  # the recorded base is not local
    with pytest.raises(CheckpointError, match=r"needs its base model.*'some-org/not-here' is not a local folder"):
        mergelab.merge("task_arithmetic", None, [adapter], scale=1.0)
    BertForSequenceClassification(BertConfig(vocab_size=29, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=48, max_position_embeddings=40)).save_pretrained(
        tmp_path / "wide")  # fmt: skip
    with pytest.raises(
        CheckpointError,
        match=r"'bert\.encoder\.layer\.\d\.attention\.self\.(query|value)\.weight' has "
        r"shape \[48, 48\] in base",
    ):
        mergelab.merge("task_arithmetic", tmp_path / "wide", [adapter], scale=1.0)
    roberta = tiny_classifier("roberta", tmp_path / "roberta")
    with pytest.raises(
        CheckpointError, match=r"adapts module 'bert\.encoder\.layer\.0\.attention\.self\.(query|value)' but base"
    ):
        mergelab.merge("task_arithmetic", roberta, [adapter], scale=1.0)
    set_config(adapter, base_model_name_or_path=str(cls_base), target_modules=["query"])
    with pytest.raises(CheckpointError, match=r"module '.*value'.*does not target"):
        mergelab.merge("task_arithmetic", cls_base, [adapter], scale=1.0)
    set_config(adapter, target_modules=ATTN, rank_pattern={"value": 2})
    with pytest.raises(CheckpointError, match=r"value' has factors of rank 4 .* r=2"):
        mergelab.merge("task_arithmetic", cls_base, [adapter], scale=1.0)


def test_adapters_on_different_bases_need_an_explicit_base(cls_base, tmp_path):
    other = tiny_classifier("bert", tmp_path / "other", seed=7)
    first, _ = make_adapter(cls_base, tmp_path / "ad1", target_modules=ATTN)
    second, _ = make_adapter(other, tmp_path / "ad2", target_modules=ATTN)
    with pytest.raises(CheckpointError, match=r"name different bases"):
        mergelab.merge("task_arithmetic", None, [first, second], scale=1.0)


# --- (6) streaming: one tensor per get, never the whole model ---


class Counting:
    """A reader wrapper that records every ``get`` and how many of the tensors it returned are alive at once."""

    def __init__(self, inner) -> None:
        self.inner, self.path, self.gets, self.live, self.peak = inner, inner.path, [], 0, 0

    config_dir = property(lambda self: self.inner.config_dir)

    def keys(self):
        return self.inner.keys()

    def shape(self, name):
        return self.inner.shape(name)

    def dtype(self, name):
        return self.inner.dtype(name)

    def get(self, name):
        tensor = self.inner.get(name)
        self.gets.append(name)
        self.live += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._freed)
        return tensor

    def _freed(self) -> None:
        self.live -= 1


def test_adapter_reader_reads_one_tensor_per_get(cls_base, tmp_path):
    adapters = []
    for seed in (1, 2):
        folder, _ = make_adapter(
            cls_base, tmp_path / f"ad{seed}", seed=seed, target_modules=["query", "value", "dense"]
        )
        reader = AdapterReader(folder, Counting(open_checkpoint(cls_base)))
        reader.adapter = Counting(reader.adapter)
        adapters.append(reader)
    reader = adapters[0]
    assert reader.keys() == reader.base.keys() and not reader.base.gets and not reader.adapter.gets  # headers only
    name = "bert.encoder.layer.1.attention.self.value.weight"
    assert reader.shape(name) == reader.base.shape(name) and reader.dtype(name) == reader.base.dtype(name)
    reader.get(name)
    module = "base_model.model.bert.encoder.layer.1.attention.self.value"
    assert reader.base.gets == [name]
    assert sorted(reader.adapter.gets) == [f"{module}.lora_A.weight", f"{module}.lora_B.weight"]
    reader.get("bert.embeddings.word_embeddings.weight")  # not adapted: the base's tensor, no factor read
    assert reader.base.gets[-1] == "bert.embeddings.word_embeddings.weight" and len(reader.adapter.gets) == 2

    for r in adapters:
        r.base.gets.clear()
        r.adapter.gets.clear()
        r.base.peak = r.adapter.peak = r.base.live = r.adapter.live = 0
    ties = mergelab.merge("ties", cls_base, adapters, density=0.5, scale=1.0, scope="global").state  # statistics passes
    merged = {k for k, v in ties.items() if v.is_floating_point() and not k.startswith("classifier.")}
    for r in adapters:
        assert r.base.peak == 1 and r.adapter.peak <= 2  # one base tensor and its two factors at a time
        # each merged tensor once per pass read (statistics passes 0 and 1, which carries the sign statistics here,
        # and the merge; the third statistics pass is not needed), nothing else
        counts = Counter(r.base.gets)
        assert set(counts) == merged and set(counts.values()) == {3}
        assert max(Counter(r.adapter.gets).values()) == 3
