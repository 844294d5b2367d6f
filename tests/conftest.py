"""Shared fixtures: tiny random BERT checkpoints written to a temp dir (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, BertModel

TINY_BERT = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
    max_position_embeddings=32, type_vocab_size=2,
)  # fmt: skip


def pytest_configure(config):
    """Fused merge steps run eagerly in tests (same arithmetic, no compile per test process); tests/test_fused.py
    compiles them and checks the compiled results equal these."""
    os.environ.setdefault("MERGELAB_COMPILE", "0")


def tiny_bert_config(num_labels: int = 3) -> BertConfig:
    return BertConfig(**TINY_BERT, num_labels=num_labels)


def make_family(root: Path, num_models: int = 3, seed: int = 0, noise: float = 0.02,
                dtype: torch.dtype = torch.float32) -> tuple[Path, list[Path]]:  # fmt: skip
    """A bare BertModel base (like all-MiniLM-L6-v2) and `num_models` BertForSequenceClassification fine-tunes
    (base + random task vectors, `bert.` prefix, own classifier head), saved as HF folders."""
    torch.manual_seed(seed)
    base = BertModel(tiny_bert_config())
    base_dir = root / "base"
    base.to(dtype).save_pretrained(base_dir)
    # like all-MiniLM-L6-v2 (saved by an older transformers), the base file carries an int64 buffer
    state = load_file(str(base_dir / "model.safetensors"))
    state["embeddings.position_ids"] = torch.arange(TINY_BERT["max_position_embeddings"]).unsqueeze(0)
    save_file(state, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    finetuned = []
    for t in range(num_models):
        model = BertForSequenceClassification(tiny_bert_config(num_labels=2 + t))
        model.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in model.bert.parameters():
                param.add_(noise * torch.randn_like(param))
        path = root / f"ft{t}"
        model.to(dtype).save_pretrained(path)
        finetuned.append(path)
    return base_dir, finetuned


@pytest.fixture
def family(tmp_path: Path) -> tuple[Path, list[Path]]:
    return make_family(tmp_path)


@pytest.fixture
def count_calls(monkeypatch: pytest.MonkeyPatch):
    """``count_calls(module, "name")`` wraps ``module.name`` so each call is recorded (kwargs) in the returned list."""

    def install(module: object, name: str) -> list[dict]:
        calls: list[dict] = []
        real = getattr(module, name)

        def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls.append(kwargs)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
        return calls

    return install


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead, and spin badly when the CPU cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray (2 CPUs, no dashboard) for one test module; skipped where Ray is not installed."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
