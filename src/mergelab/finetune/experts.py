"""Task experts: the pretrained encoder fine-tuned once per task with a fresh head, cached by content.

AdamW with linear decay, seeded, dynamic padding; a rich progress bar shows examples/s. The checkpoint is an
ordinary Hugging Face ``*ForSequenceClassification`` folder (saved atomically), keyed by everything that
determines it, and reused on the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import torch

from mergelab.io.writer import atomic_folder
from mergelab.models.fingerprint import checkpoint_fingerprint
from mergelab.progress import progress_bar


def expert_cache_key(base_path: Path, task: Any, **hyper: Any) -> str:
    """Hash of the base weights, the task's data and every hyper-parameter (and the mergelab version)."""
    from mergelab import __version__

    payload = {"base": checkpoint_fingerprint(base_path), "task": task.content_hash(), "hyper": hyper,
               "mergelab": __version__}  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


class _Threads:
    def __init__(self, threads: int | None) -> None:
        self.threads, self.saved = threads, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.saved)


def finetune_expert(base_path: str | os.PathLike[str], task: Any, out_dir: str | os.PathLike[str], epochs: float = 1.0,
                    lr: float = 5e-5, max_length: int = 64, batch_size: int = 32, seed: int = 0,
                    train_size: int | None = None, weight_decay: float = 0.01, warmup_ratio: float = 0.0,
                    threads: int | None = None, progress: bool = True) -> Path:  # fmt: skip
    """Fine-tune ``base_path`` on ``task``'s train split with a fresh head; save an HF checkpoint atomically."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    with _Threads(threads):
        torch.manual_seed(seed)
        random.seed(seed)
        names = list(task.label_names)
        model = AutoModelForSequenceClassification.from_pretrained(
            base_path, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
        )  # fmt: skip
        tokenizer = AutoTokenizer.from_pretrained(base_path)
        train = task.splits["train"]
        indices = list(range(len(train)))
        if train_size is not None and train_size < len(indices):
            from mergelab.data.splits import stratified_subsample

            indices = stratified_subsample(train.labels, train_size, seed).tolist()
        encoded = tokenizer([train.texts[i] for i in indices], truncation=True, max_length=max_length)
        labels = [train.labels[i] for i in indices]
        steps_per_epoch = max(1, (len(indices) + batch_size - 1) // batch_size)
        total_steps = max(1, int(round(epochs * steps_per_epoch)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        losses = []
        with progress_bar(progress, f"fine-tuning {task.name}", total_steps * batch_size) as advance:
            step = 0
            while step < total_steps:
                order = torch.randperm(len(indices), generator=generator).tolist()
                for start in range(0, len(order), batch_size):
                    if step >= total_steps:
                        break
                    idx = order[start : start + batch_size]
                    batch = tokenizer.pad({k: [encoded[k][i] for i in idx] for k in encoded}, return_tensors="pt")
                    out = model(**batch, labels=torch.tensor([labels[i] for i in idx]))
                    out.loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(float(out.loss.detach()))
                    step += 1
                    if advance:
                        advance(len(idx))
        model.eval()
        with atomic_folder(Path(out_dir), force=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "mergelab_training.json").write_text(json.dumps(
                {"task": task.name, "examples": len(indices), "steps": total_steps, "first_loss": losses[0],
                 "last_loss": sum(losses[-10:]) / len(losses[-10:]), "lr": lr, "epochs": epochs, "seed": seed,
                 "max_length": max_length, "batch_size": batch_size}, indent=2))  # fmt: skip
    return Path(out_dir)


def get_or_train_expert(cache_dir: str | os.PathLike[str], base_path: str | os.PathLike[str], task: Any,
                        **hyper: Any) -> Path:  # fmt: skip
    """The cached expert for (base, task, hyper-parameters), training it first if it is not there."""
    threads = hyper.pop("threads", None)
    progress = hyper.pop("progress", True)
    key = expert_cache_key(Path(base_path), task, **hyper)
    target = Path(cache_dir) / f"{task.name}-{key}"
    if (target / "config.json").exists():
        return target
    return finetune_expert(base_path, task, target, threads=threads, progress=progress, **hyper)
