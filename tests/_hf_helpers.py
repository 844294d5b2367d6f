"""Tiny random Hugging Face models, a tiny word-level tokenizer and stand-in tasks, written to temp dirs.

No downloads: every model is built from a small config (hidden 32, 2 layers) and saved with ``save_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["alpha", "beta", "gamma", "delta", "red", "green", "blue", "cat", "dog", "fish", "sun", "moon", "star",
         "rock", "tree", "leaf", "wind", "rain", "fire", "ice", "sand", "snow", "salt", "gold"]  # fmt: skip
VOCAB = len(SPECIAL) + len(WORDS)
KINDS = ("bert", "roberta", "xlm-roberta", "distilbert")


@dataclass
class Split:
    """Stand-in for mergelab.data's TextSplit (texts + labels), optionally with an ``inputs`` tensor."""

    texts: list[str]
    labels: list[int]
    inputs: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Task:
    """Stand-in for mergelab.data's TextTask: name, splits, label names, content hash."""

    name: str
    splits: dict[str, Split]
    label_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def content_hash(self) -> str:
        digest = hashlib.sha256(json.dumps(self.label_names).encode())
        for name in sorted(self.splits):
            split = self.splits[name]
            digest.update(json.dumps([name, split.texts, split.labels]).encode())
            if split.inputs is not None:
                digest.update(split.inputs.numpy().tobytes())
        return digest.hexdigest()


def make_task(name: str = "t", num_classes: int = 3, per_class: int = 8, seed: int = 0,
              test_per_class: int = 5) -> Task:  # fmt: skip
    """Class c draws its words from its own slice of the vocabulary, so the task is learnable."""
    rng = random.Random(seed)
    width = len(WORDS) // num_classes

    def split(n: int) -> Split:
        texts, labels = [], []
        for c in range(num_classes):
            for _ in range(n):
                words = WORDS[c * width : (c + 1) * width]
                texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(2, 9))))
                labels.append(c)
        return Split(texts, labels)

    splits = {"train": split(per_class), "validation": split(2), "test": split(test_per_class)}
    return Task(name, splits, [f"class{c}" for c in range(num_classes)])


def write_tokenizer(folder: Path) -> BertTokenizerFast:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(SPECIAL + WORDS)})
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_config(kind: str, num_labels: int = 3, label_names: list[str] | None = None):  # noqa: ANN201
    names = label_names or [f"class{i}" for i in range(num_labels)]
    labels = dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=40, **labels)  # fmt: skip
    if kind == "bert":
        return BertConfig(**common)
    if kind == "roberta":
        return RobertaConfig(pad_token_id=0, bos_token_id=2, eos_token_id=3, **common)
    if kind == "xlm-roberta":
        return XLMRobertaConfig(pad_token_id=0, bos_token_id=2, eos_token_id=3, **common)
    return DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=40,
                            pad_token_id=0, **labels)  # fmt: skip


CLASSES = {"bert": BertForSequenceClassification, "roberta": RobertaForSequenceClassification,
           "xlm-roberta": XLMRobertaForSequenceClassification, "distilbert": DistilBertForSequenceClassification}


def tiny_classifier(kind: str, folder: Path, num_labels: int = 3, seed: int = 0,
                    label_names: list[str] | None = None) -> Path:  # fmt: skip
    """A random ``*ForSequenceClassification`` (non-zero biases everywhere) + tokenizer saved to ``folder``."""
    torch.manual_seed(seed)
    model = CLASSES[kind](tiny_config(kind, num_labels, label_names))
    with torch.no_grad():  # random biases, so a wrong split of the head (a missed bias or activation) shows
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    model.eval().save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def tiny_base(folder: Path, seed: int = 0, position_ids: bool = True) -> Path:
    """A bare BertModel folder (keys ``embeddings.*``, ``encoder.*``, ``pooler.*``) like all-MiniLM-L6-v2."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    config = tiny_config("bert")
    config.initializer_range = 0.2  # larger random features than the default 0.02: a few steps fine-tune it
    BertModel(config).eval().save_pretrained(folder)
    if position_ids:  # like all-MiniLM-L6-v2 (saved by an older transformers), the file has an int64 buffer
        state = load_file(str(folder / "model.safetensors"))
        state["embeddings.position_ids"] = torch.arange(config.max_position_embeddings).unsqueeze(0)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer(folder)
    return folder


def own_logits(folder: Path, texts: list[str]) -> torch.Tensor:
    """The fine-tuned model's own logits in eval mode, one padded batch."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, truncation=True, return_tensors="pt")).logits
