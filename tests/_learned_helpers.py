"""Tiny BERT families with a real word-level tokenizer and synthetic text tasks, written to a temp dir (no
downloads): a bare ``BertModel`` base and ``BertForSequenceClassification`` experts fine-tuned from it."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

from mergelab.data.tasks import TextSplit, TextTask

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "apple",
    "pear",
    "plum",
    "fig",
    "kiwi",
    "lime",
    "oak",
    "elm",
    "ash",
    "fir",
    "yew",
    "pine",
    "bus",
    "car",
    "van",
    "cab",
    "jet",
    "ship",
]
HIDDEN = 16


def write_tokenizer(folder: Path) -> BertTokenizerFast:
    """A word-level BERT tokenizer over SPECIAL + WORDS, saved to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(SPECIAL + WORDS)})
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_config(num_labels: int = 2) -> BertConfig:
    labels = {i: f"c{i}" for i in range(num_labels)}
    return BertConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=num_labels,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )


def text_task(name: str, offset: int, num_classes: int = 2, per_class: int = 8, seed: int = 0) -> TextTask:
    """Class c of the task draws its words from its own group of three words (groups start at ``offset``)."""
    rng = random.Random(seed)
    groups = [WORDS[(offset + 3 * c) % len(WORDS) : (offset + 3 * c) % len(WORDS) + 3] for c in range(num_classes)]

    def split(n: int) -> TextSplit:
        texts, labels = [], []
        for c in range(num_classes):
            for _ in range(n):
                texts.append(" ".join(rng.choice(groups[c]) for _ in range(rng.randint(2, 6))))
                labels.append(c)
        return TextSplit(texts, labels)

    return TextTask(
        name,
        {"train": split(per_class), "validation": split(4), "test": split(5)},
        [f"c{c}" for c in range(num_classes)],
    )


def train_briefly(
    model: BertForSequenceClassification, task: TextTask, tokenizer: BertTokenizerFast, steps: int, lr: float = 3e-3
) -> None:
    """A few full-batch Adam steps on the task's train split (enough to make the expert right on its task)."""
    if steps <= 0:
        return
    batch = tokenizer(task.splits["train"].texts, padding=True, return_tensors="pt")
    labels = torch.tensor(task.splits["train"].labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def tiny_family(
    root: Path, num_tasks: int = 2, seed: int = 0, noise: float = 0.05, train_steps: int = 0
) -> tuple[Path, dict[str, Path], dict[str, TextTask]]:
    """(base folder, {task: expert folder}, {task: TextTask}); expert t = base + noise on the encoder, its own head,
    optionally trained ``train_steps`` full-batch steps on task t."""
    torch.manual_seed(seed)
    base = BertModel(tiny_config()).eval()
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    tokenizer = write_tokenizer(base_dir)
    finetuned, tasks = {}, {}
    for t in range(num_tasks):
        name = f"task{t}"
        task = text_task(name, offset=6 * t, seed=seed + t)
        model = BertForSequenceClassification(tiny_config(task.num_classes))
        model.bert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in model.bert.parameters():
                param.add_(noise * torch.randn_like(param))
        train_briefly(model, task, tokenizer, train_steps)
        folder = root / name
        model.eval().save_pretrained(folder)
        write_tokenizer(folder)
        finetuned[name], tasks[name] = folder, task
    return base_dir, finetuned, tasks
