"""Tiny text tasks and tiny HF classifiers with a real tokenizer, written to a temp dir (no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from mergelab.data.tasks import TextSplit, TextTask

WORDS = ["alpha", "beta", "gamma", "delta", "red", "green", "blue", "cat", "dog", "fish", "sun", "moon", "star",
         "rock", "tree", "leaf", "wind", "rain", "fire", "ice"]  # fmt: skip
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tokenizer(folder: Path) -> BertTokenizerFast:
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(SPECIAL + WORDS)})
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_task(name: str, num_classes: int = 3, per_class: int = 12, seed: int = 0) -> TextTask:
    """Class c uses words from its own slice of the vocabulary, so tasks are learnable."""
    rng = random.Random(seed)
    slices = [WORDS[(c * 6) % len(WORDS):(c * 6) % len(WORDS) + 6] for c in range(num_classes)]

    def split(n: int) -> TextSplit:
        texts, labels = [], []
        for c in range(num_classes):
            for _ in range(n):
                texts.append(" ".join(rng.choice(slices[c]) for _ in range(rng.randint(3, 8))))
                labels.append(c)
        return TextSplit(texts, labels)

    return TextTask(name, {"train": split(per_class), "validation": split(4), "test": split(6)},
                    [f"class{c}" for c in range(num_classes)], {"source": "synthetic"})  # fmt: skip


def tiny_classifier(kind: str, folder: Path, num_labels: int = 3, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    vocab = len(SPECIAL) + len(WORDS)
    id2label = {i: f"class{i}" for i in range(num_labels)}
    common = dict(vocab_size=vocab, num_labels=num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    if kind == "bert":
        model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=48, max_position_embeddings=64, **common))
    elif kind == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                               intermediate_size=48, max_position_embeddings=70,
                                                               pad_token_id=0, **common))  # fmt: skip
    else:
        model = DistilBertForSequenceClassification(DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                                                                     max_position_embeddings=64, **common))  # fmt: skip
    model.eval().save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def write_task_folder(task: TextTask, folder: Path) -> Path:
    """The task as a data folder of ``{split}.csv`` files with ``text`` and ``label`` (label names) columns."""
    import pandas as pd

    folder.mkdir(parents=True)
    for split, data in task.splits.items():
        pd.DataFrame({"text": data.texts, "label": [task.label_names[y] for y in data.labels]}).to_csv(
            folder / f"{split}.csv", index=False)  # fmt: skip
    return folder


def tiny_bare_base(root: Path, seed: int = 0) -> Path:
    """A bare tiny BERT encoder with its tokenizer in ``root/base`` (like all-MiniLM-L6-v2: no head)."""
    from transformers import AutoModel, AutoTokenizer

    classifier = tiny_classifier("bert", root / "cls", seed=seed)
    bare = root / "base"
    AutoModel.from_pretrained(classifier).save_pretrained(bare)
    AutoTokenizer.from_pretrained(classifier).save_pretrained(bare)
    return bare


def two_task_bench(root: Path, per_class: int, epochs: int) -> dict:
    """The shared part of a tiny bench config: a bare tiny base and two task folders (2 and 3 classes) in ``root``."""
    bare = tiny_bare_base(root)
    tasks = [write_task_folder(make_task(f"t{i}", num_classes=2 + i, per_class=per_class, seed=i), root / f"t{i}")
             for i in range(2)]  # fmt: skip
    return {"base": str(bare), "tasks": [{"name": f"t{i}", "path": str(p)} for i, p in enumerate(tasks)],
            "data": {"fewshot_pool_per_class": 4},
            "finetune": {"epochs": epochs, "lr": 3.0e-3, "max_length": 16, "batch_size": 8}}  # fmt: skip


def tiny_clip_config(tokenizer):  # noqa: ANN001, ANN201
    """A tiny HF CLIPConfig (32-wide towers, 32 px images in 8 px patches) for the word-level test tokenizer."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, eos_token_id=tokenizer.sep_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )  # fmt: skip
