"""Task experts: the pretrained encoder fine-tuned once per task with a fresh head, cached by content.

Recipe (standard HF fine-tuning): AdamW (no weight decay on biases and LayerNorm weights), linear warm-up then
linear decay, gradient norm clipped at 1.0, a fresh seeded shuffle per epoch, dynamic padding, dropout on. Runs are
seeded without touching the caller's global RNG state, and use ``threads`` CPU threads only when asked (restored
afterwards). ``device`` (default ``"auto"``: CUDA, else MPS, else the CPU, so a CPU-only machine trains exactly as
before) is where the model, the batches and the optimizer state live; ``precision`` (a ``FinetuneConfig`` field)
autocasts the forward passes to bf16 / fp16 there. The trained model is moved back to the CPU to be saved. A rich progress bar shows examples/s. An expert is an ordinary Hugging Face
``*ForSequenceClassification`` folder (plus ``mergelab_training.json``), saved atomically: written to a temporary
folder next to the target and renamed onto it, so a failed run leaves nothing behind.

The multi-task-learning baseline trains one shared encoder on all tasks (one head per task, round-robin batches)
and saves the encoder in base layout plus ``heads/<task>.safetensors``; :func:`load_multitask` turns it back into
one ``TaskModel`` per task.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mergelab import __version__
from mergelab.core.device import CPU, DeviceLike, autocast, check_precision, module_device, resolve_device, to_device
from mergelab.core.errors import CheckpointError, ConfigError, DataError
from mergelab.core.progress import progress_bar
from mergelab.core.rng import derive_seed
from mergelab.core.sampling import stratified_subsample
from mergelab.finetune.config import FinetuneConfig
from mergelab.finetune.probe import fit_linear_probe
from mergelab.io.fingerprint import checkpoint_fingerprint
from mergelab.io.writer import atomic_folder
from mergelab.models.hf import (
    architecture,
    classifier_head_state,
    head_from_state,
    load_encoder,
    load_linear_head,
    load_tokenizer,
    max_positions,
    save_pooled_classifier,
)
from mergelab.models.task_model import TaskModel, check_label_names

PathLike = str | os.PathLike[str]
TRAINING_LOG = "mergelab_training.json"
MULTITASK_LOG = "mergelab_multitask.json"
PROBE_FILE = "mergelab_probe.safetensors"
MAX_GRAD_NORM = 1.0


# ------------------------------------------------------------------------------------------------ pure helpers


def train_examples(task: Any, train_size: int | None, seed: int) -> tuple[list[str], list[int]]:
    """The train split's texts and labels, or a seeded stratified subset of ``train_size`` of them."""
    train = task.splits.get("train")
    if train is None or len(train.labels) == 0:
        raise DataError(f"task '{task.name}' has no training examples; add a train split")
    if len(task.label_names) < 2:
        raise DataError(f"task '{task.name}' has {len(task.label_names)} class(es); classification needs at least 2")
    indices = list(range(len(train.labels)))
    if train_size is not None and train_size < len(indices):
        indices = [int(i) for i in stratified_subsample(train.labels, train_size, seed)]
    return [str(train.texts[i]) for i in indices], [int(train.labels[i]) for i in indices]


def batch_schedule(num_examples: int, batch_size: int, epochs: float, seed: int) -> list[list[int]]:
    """Index batches for ``epochs`` passes (fractional epochs stop early): a fresh seeded shuffle per epoch, the
    last batch of an epoch may be smaller. ``ceil(epochs × batches per epoch)`` batches, at least one."""
    per_epoch = -(-num_examples // batch_size)
    total = max(1, math.ceil(epochs * per_epoch - 1e-9))
    generator = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    while len(out) < total:
        order = torch.randperm(num_examples, generator=generator).tolist()
        out += [order[i : i + batch_size] for i in range(0, num_examples, batch_size)]
    return out[:total]


def round_robin(schedules: Sequence[Sequence[list[int]]]) -> list[tuple[int, list[int]]]:
    """Interleave per-task batch lists: task 0 batch 0, task 1 batch 0, ..., task 0 batch 1, ... (exhausted tasks
    drop out)."""
    out = []
    for step in range(max((len(s) for s in schedules), default=0)):
        out += [(t, list(s[step])) for t, s in enumerate(schedules) if step < len(s)]
    return out


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on weights, none on biases and normalisation weights (as HF Trainer)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = name.endswith("bias") or "layernorm" in name.lower() or "layer_norm" in name.lower()
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def safe_name(name: str) -> str:
    """A task name usable as a file or folder name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "task"


def train_split_hash(task: Any) -> str:
    """sha256 over the label names and the train split (all an expert sees of its task)."""
    train = task.splits["train"]
    digest = hashlib.sha256(json.dumps([str(n) for n in task.label_names]).encode())
    for text, label in zip(train.texts, train.labels, strict=True):
        digest.update(f"{int(label)}\t{len(text)}\t".encode())
        digest.update(str(text).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------- training


@contextmanager
def seeded_threads(seed: int, threads: int | None, device: torch.device = CPU) -> Iterator[None]:
    """Seed torch inside a forked RNG (the caller's RNG state, CUDA's on a CUDA ``device`` too, is untouched) and
    use ``threads`` threads if given."""
    saved = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be positive, got {threads}")
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(saved)


def check_device_and_precision(device: DeviceLike, cfg: FinetuneConfig) -> torch.device:
    """The resolved training device, which must run ``cfg.precision`` (bf16 / fp16 need an accelerator)."""
    where = resolve_device(device)
    check_precision(where, cfg.precision)
    return where


def _base_config(base_path: PathLike) -> Any:
    from transformers import AutoConfig  # lazy: transformers costs ~2 s to import


    folder = Path(base_path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"base model {folder} is not a Hugging Face model folder (no config.json)")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    architecture(config.model_type)  # fail before training on a family mergelab cannot evaluate
    return config


def _fresh_classifier(base_path: PathLike, label_names: Sequence[str]) -> nn.Module:
    from transformers import AutoModelForSequenceClassification  # lazy: transformers costs ~2 s to import

    names = [str(n) for n in label_names]
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base_path), local_files_only=True, id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True,
    ).float()  # fmt: skip
    if model.config.num_labels != len(names):  # id2label sets num_labels; a head of another size would be wrong
        raise CheckpointError(f"{base_path}: the new head has {model.config.num_labels} outputs, not {len(names)}")
    return model


class PooledClassifier(nn.Module):
    """A text encoder (mean pooling) and a Linear head, trained together: ``forward(**batch)`` gives logits."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(**batch))


def last_linear(head: nn.Module) -> nn.Linear:
    """The output layer of a head (the module itself when it is a Linear)."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"the head {type(head).__name__} has no Linear layer")
    return linears[-1]


def head_shift(initial: torch.Tensor, final: torch.Tensor) -> float:
    """How far a head's weight moved from its initialisation: ‖W − W₀‖ / ‖W₀‖ (Frobenius norms)."""
    return float(torch.linalg.norm(final.double() - initial.double()) / torch.linalg.norm(initial.double()).clamp_min(1e-12))


def random_linear_head(width: int, num_classes: int, seed: int) -> nn.Linear:
    """A fresh head as Hugging Face initialises one: weight ~ N(0, 0.02), bias 0, from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(width, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(num_classes, width, generator=generator) * 0.02)
        head.bias.zero_()
    return head


def optimizer_groups(model: nn.Module, cfg: FinetuneConfig, heads: Sequence[nn.Module] = ()) -> list[dict[str, Any]]:
    """AdamW groups: :func:`decay_groups` at ``lr``, with the heads' parameters in groups of their own at
    ``head_lr`` (``lr`` when unset)."""
    head_ids = {id(p) for head in heads for p in head.parameters()}
    out = []
    for group in decay_groups(model, cfg.weight_decay):
        body = [p for p in group["params"] if id(p) not in head_ids]
        tops = [p for p in group["params"] if id(p) in head_ids]
        out += [{"params": body, "weight_decay": group["weight_decay"], "lr": cfg.lr},
                {"params": tops, "weight_decay": group["weight_decay"], "lr": cfg.head_lr or cfg.lr}]  # fmt: skip
    return [g for g in out if g["params"]]


def _run_steps(model: nn.Module, steps: Sequence[tuple[int, list[int]]],
               loss_of: Callable[[int, list[int]], torch.Tensor], cfg: FinetuneConfig, description: str,
               progress: bool, heads: Sequence[nn.Module] = ()) -> dict[str, Any]:  # fmt: skip
    """AdamW + linear schedule over ``steps`` ((task, batch indices) pairs); returns the per-step losses and speed."""
    from transformers import get_linear_schedule_with_warmup  # lazy: transformers costs ~2 s to import

    optimizer = torch.optim.AdamW(optimizer_groups(model, cfg, heads), lr=cfg.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * len(steps)), len(steps))
    scaler = torch.amp.GradScaler(module_device(model).type, enabled=cfg.precision == "fp16")  # off: plain steps
    model.train()
    losses: list[float] = []
    examples = sum(len(idx) for _, idx in steps)
    started = time.perf_counter()
    with progress_bar(progress, description, examples) as advance:
        for task_index, idx in steps:
            loss = loss_of(task_index, idx)
            if not torch.isfinite(loss):
                raise ConfigError(f"{description}: the loss became {float(loss)} at step {len(losses)}; lower lr")
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if advance is not None:
                advance(len(idx))
    model.eval()
    seconds = time.perf_counter() - started
    tail = losses[-max(1, len(losses) // 10) :]
    return {"steps": len(steps), "examples_seen": examples, "seconds": round(seconds, 3),
            "examples_per_second": round(examples / seconds, 2) if seconds > 0 else None,
            "first_loss": losses[0], "last_loss": sum(tail) / len(tail), "losses": losses}  # fmt: skip


def _pad(tokenizer: Any, encoded: Mapping[str, list[Any]], idx: list[int]) -> dict[str, torch.Tensor]:
    return tokenizer.pad({k: [encoded[k][i] for i in idx] for k in encoded}, return_tensors="pt")


def _batch_loss(model: nn.Module, tokenizer: Any, encoded: Mapping[str, list[Any]], labels: Sequence[int],
                idx: list[int], precision: str = "fp32") -> torch.Tensor:  # fmt: skip
    """The batch's cross-entropy, on the model's device (autocast to ``precision`` there; the loss in float32)."""
    device = module_device(model)
    target = torch.tensor([labels[i] for i in idx], dtype=torch.long).to(device)
    batch = to_device(_pad(tokenizer, encoded, idx), device)
    with autocast(device, precision):
        if isinstance(model, PooledClassifier):
            return nn.functional.cross_entropy(model(**batch).float(), target)
        return model(**batch, labels=target).loss.float()


def _probe_and_head(encoder: Any, texts: list[str], labels: list[int], num_classes: int, cfg: FinetuneConfig,
                    seed: int) -> tuple[nn.Linear, nn.Linear, dict[str, Any]]:  # fmt: skip
    """The frozen-encoder probe on the train texts, and the head to start from (a copy of it, or random)."""
    features = encoder.encode_texts(texts, max_length=cfg.max_length, precision=cfg.precision)  # on the CPU
    probe, info = fit_linear_probe(features, labels, num_classes, seed=seed)
    if cfg.head_init == "probe":
        head = copy.deepcopy(probe)
    else:
        head = random_linear_head(features.shape[1], num_classes, derive_seed(seed, "head"))
    return probe, head, info


def _write_probe(folder: Path, probe: nn.Linear) -> None:
    save_file({"weight": probe.weight.detach().contiguous(), "bias": probe.bias.detach().contiguous()},
              str(folder / PROBE_FILE))  # fmt: skip


def load_probe(folder: PathLike, num_classes: int) -> nn.Linear | None:
    """The frozen-encoder probe an expert folder was trained beside (None for experts saved without one)."""
    file = Path(folder) / PROBE_FILE
    return load_linear_head(file, num_classes) if file.is_file() else None


def _train_pooled(base_path: PathLike, task: Any, cfg: FinetuneConfig, texts: list[str], labels: list[int],
                  progress: bool, device: torch.device = CPU) -> tuple[Any, nn.Linear, nn.Linear, dict[str, Any]]:  # fmt: skip
    """Mean-pooled encoder + Linear head fine-tuned from the probe (or a random head) on ``device``: (encoder,
    head, probe, log), back on the CPU."""
    seed = cfg.task_seed(task.name)
    encoder = load_encoder(base_path, base_path, pooling="mean").to(device)
    probe, head, probe_info = _probe_and_head(encoder, texts, labels, len(task.label_names), cfg, seed)
    initial = head.weight.detach().clone()  # on the CPU, as the trained head is when compared
    head = head.to(device)
    encoded = encoder.tokenizer(texts, truncation=True, max_length=encoder.max_length(cfg.max_length))
    model = PooledClassifier(encoder, head)
    steps = [(0, idx) for idx in batch_schedule(len(texts), cfg.batch_size, cfg.epochs, derive_seed(seed, "batches"))]
    log = _run_steps(model, steps, lambda _, idx: _batch_loss(model, encoder.tokenizer, encoded, labels, idx,
                                                              cfg.precision),
                     cfg, f"fine-tuning {task.name}", progress, heads=[head])  # fmt: skip
    model.to(CPU)  # deliberate: the expert is saved (and used) from the CPU
    encoder.eval()
    log.update(probe=probe_info, head_init=cfg.head_init, head_shift=head_shift(initial, head.weight.detach()))
    return encoder, head, probe, log


def _train_native(base_path: PathLike, task: Any, cfg: FinetuneConfig, texts: list[str], labels: list[int],
                  progress: bool, device: torch.device = CPU) -> tuple[nn.Module, Any, nn.Linear, dict[str, Any]]:  # fmt: skip
    """The family's own sequence classifier, its head started from the probe where that head is one Linear,
    trained on ``device`` and returned on the CPU."""
    seed = cfg.task_seed(task.name)
    encoder = load_encoder(base_path, base_path).to(device)
    probe, _, probe_info = _probe_and_head(encoder, texts, labels, len(task.label_names), cfg, seed)
    model = _fresh_classifier(base_path, task.label_names)
    out_layer = last_linear(architecture(model.config.model_type).head(model))
    head_init = cfg.head_init
    with torch.no_grad():
        if cfg.head_init == "probe" and len(architecture(model.config.model_type).head_modules) == 1 \
                and isinstance(model.classifier, nn.Linear):  # fmt: skip
            out_layer.weight.copy_(probe.weight)
            out_layer.bias.copy_(probe.bias)
        else:  # a head with hidden layers cannot start from the probe: random, as Hugging Face initialises it
            head_init = "random"
            fresh = random_linear_head(out_layer.in_features, out_layer.out_features, derive_seed(seed, "head"))
            out_layer.load_state_dict(fresh.state_dict())
    del encoder  # only the probe's features came from it
    initial = out_layer.weight.detach().clone()  # on the CPU, as the trained head is when compared
    model.to(device)
    tokenizer = load_tokenizer(base_path)
    encoded = tokenizer(texts, truncation=True, max_length=min(cfg.max_length, max_positions(model.config)))
    steps = [(0, idx) for idx in batch_schedule(len(texts), cfg.batch_size, cfg.epochs, derive_seed(seed, "batches"))]
    log = _run_steps(model, steps, lambda _, idx: _batch_loss(model, tokenizer, encoded, labels, idx, cfg.precision),
                     cfg, f"fine-tuning {task.name}", progress, heads=[model.classifier])  # fmt: skip
    model.to(CPU)  # deliberate: the expert is saved from the CPU
    log.update(probe=probe_info, head_init=head_init, head_shift=head_shift(initial, out_layer.weight.detach()))
    return model, tokenizer, probe, log


def finetune_expert(base_path: PathLike, task: Any, out_dir: PathLike, *, threads: int | None = None,
                    progress: bool = True, device: DeviceLike = "auto", **hyper: Any) -> Path:  # fmt: skip
    """Fine-tune the pretrained ``base_path`` on ``task``'s train split (:class:`FinetuneConfig` names every
    hyper-parameter and its default); save to ``out_dir``.

    ``out_dir`` becomes a pooled classifier (``pooling: mean``) or the family's HF classifier folder (``native``),
    with the tokenizer, ``mergelab_probe.safetensors`` (the frozen-encoder probe: the bar the expert must clear)
    and ``mergelab_training.json`` (per-step losses, examples/s, the probe's C, how far the head moved), replacing
    an existing one atomically. ``device``: where it trains (module doc); not part of the expert's cache key.
    """
    cfg = FinetuneConfig.from_kwargs(**hyper)
    where = check_device_and_precision(device, cfg)
    _base_config(base_path)
    texts, labels = train_examples(task, cfg.train_size, cfg.seed)
    with seeded_threads(cfg.task_seed(task.name), threads, where):
        if cfg.pooling == "mean":
            encoder, head, probe, log = _train_pooled(base_path, task, cfg, texts, labels, progress, where)
        else:
            model, tokenizer, probe, log = _train_native(base_path, task, cfg, texts, labels, progress, where)
        used_threads = torch.get_num_threads()
    record = {"task": task.name, "examples": len(texts), "config": cfg.model_dump(), "threads": used_threads,
              "device": str(where), **log}  # fmt: skip
    with atomic_folder(Path(out_dir), force=True) as tmp:
        if cfg.pooling == "mean":
            save_pooled_classifier(tmp, encoder, head, [str(n) for n in task.label_names])
        else:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        _write_probe(tmp, probe)
        (tmp / TRAINING_LOG).write_text(json.dumps(record, indent=1))
    return Path(out_dir)


def expert_cache_key(base_path: PathLike, task: Any, **hyper: Any) -> str:
    """Hash of all that determines an expert: base weights, the task's name, train split and label names, every
    hyper-parameter (defaults filled in) including the seed, and the mergelab version."""
    payload = {"kind": "expert", "base": checkpoint_fingerprint(base_path), "task": str(task.name),
               "train": train_split_hash(task), "config": FinetuneConfig.from_kwargs(**hyper).model_dump(),
               "mergelab": __version__}  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def get_or_train_expert(cache_dir: PathLike, base_path: PathLike, task: Any, threads: int | None = None,
                        progress: bool = True, device: DeviceLike = "auto", **hyper: Any) -> Path:  # fmt: skip
    """The cached expert ``cache_dir/<task>-<key>`` for (base, task, hyper-parameters); trained first (on
    ``device``, which is not part of the key) if absent."""
    key = expert_cache_key(base_path, task, **hyper)
    target = Path(cache_dir) / f"{safe_name(task.name)}-{key}"
    if _complete(target):
        return target
    return finetune_expert(base_path, task, target, threads=threads, progress=progress, device=device, **hyper)


# -------------------------------------------------------------------------------------------------- multi-task


def _multitask_models(base_path: PathLike, tasks: Sequence[Any], data: Sequence[tuple[list[str], list[int]]],
                      cfg: FinetuneConfig, device: torch.device = CPU) -> tuple[nn.ModuleList, Any]:  # fmt: skip
    """One model per task sharing the first one's encoder (pooled classifiers or the family's classifiers); the
    probes' features are computed on ``device``, the models are built on the CPU."""
    models = nn.ModuleList()
    if cfg.pooling == "mean":
        encoder = load_encoder(base_path, base_path, pooling="mean").to(device)
        for task, (texts, labels) in zip(tasks, data, strict=True):
            _, head, _ = _probe_and_head(encoder, texts, labels, len(task.label_names), cfg, cfg.task_seed(task.name))
            models.append(PooledClassifier(encoder, head))
        return models.to(CPU), encoder.tokenizer
    for task in tasks:
        model = _fresh_classifier(base_path, task.label_names)
        if models:  # share the first model's encoder; the copy this one loaded is dropped
            setattr(model, model.base_model_prefix, getattr(models[0], model.base_model_prefix))
        models.append(model)
    return models, None


def finetune_multitask(base_path: PathLike, tasks: Sequence[Any], out_dir: PathLike, *, threads: int | None = None,
                       progress: bool = True, device: DeviceLike = "auto", **hyper: Any) -> Path:  # fmt: skip
    """Multi-task-learning baseline: one encoder fine-tuned on every task at once, one head per task (started
    from each task's probe with ``head_init: probe``), with the experts' :class:`FinetuneConfig`.

    Batches alternate round-robin over the tasks (``epochs`` passes over each task's train split; a smaller task
    runs out first). ``train_size`` caps each task. Saves the shared encoder in base layout (config, weights,
    tokenizer), ``heads/<task>.safetensors`` and ``mergelab_multitask.json``; load with :func:`load_multitask`.
    """
    if not tasks:
        raise DataError("finetune_multitask needs at least one task")
    names = [t.name for t in tasks]
    files = [safe_name(n) for n in names]
    if len(set(files)) != len(files):
        raise DataError(f"task names must be distinct (as file names): {names}")
    cfg = FinetuneConfig.from_kwargs(**hyper)
    config = _base_config(base_path)
    tokenizer = load_tokenizer(base_path)
    data = [train_examples(t, cfg.train_size, cfg.seed) for t in tasks]
    encoded = [tokenizer(texts, truncation=True, max_length=min(cfg.max_length, max_positions(config)))
               for texts, _ in data]  # fmt: skip
    where = check_device_and_precision(device, cfg)
    with seeded_threads(cfg.seed, threads, where):
        models, _ = _multitask_models(base_path, tasks, data, cfg, where)
        models.to(where)
        schedules = [batch_schedule(len(texts), cfg.batch_size, cfg.epochs, cfg.task_seed(t.name))
                     for t, (texts, _) in zip(tasks, data, strict=True)]  # fmt: skip

        def loss_of(t: int, idx: list[int]) -> torch.Tensor:
            return _batch_loss(models[t], tokenizer, encoded[t], data[t][1], idx, cfg.precision)

        steps = round_robin(schedules)
        heads = [m.head for m in models] if cfg.pooling == "mean" else [m.classifier for m in models]
        log = _run_steps(models, steps, loss_of, cfg, "multi-task fine-tuning", progress, heads=heads)
        models.to(CPU)  # deliberate: saved from the CPU
        used_threads = torch.get_num_threads()
    log["task_losses"] = {n: [loss for (t, _), loss in zip(steps, log["losses"], strict=True) if t == i]
                          for i, n in enumerate(names)}  # fmt: skip
    pooled = cfg.pooling == "mean"
    shared = models[0].encoder.model if pooled else getattr(models[0], models[0].base_model_prefix)
    record = {"tasks": {n: {"file": f"heads/{f}.safetensors", "label_names": [str(x) for x in t.label_names],
                            "examples": len(d[0])} for n, f, t, d in zip(names, files, tasks, data, strict=True)},
              "model_type": config.model_type, "pooling": "mean" if pooled else "native", "config": cfg.model_dump(),
              "threads": used_threads, "device": str(where), **log}  # fmt: skip
    with atomic_folder(Path(out_dir), force=True) as tmp:
        shared.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "heads").mkdir()
        for name, file, model, task in zip(names, files, models, tasks, strict=True):
            state = ({k: v.detach().contiguous() for k, v in model.head.state_dict().items()} if pooled
                     else classifier_head_state(model))  # fmt: skip
            save_file(state, str(tmp / "heads" / f"{file}.safetensors"),
                      metadata={"task": name, "label_names": json.dumps([str(x) for x in task.label_names])})
        (tmp / MULTITASK_LOG).write_text(json.dumps(record, indent=1))
    return Path(out_dir)


def multitask_cache_key(base_path: PathLike, tasks: Sequence[Any], **hyper: Any) -> str:
    """Hash of all that determines a multi-task model: base weights, every task's name, train split and label
    names (in order), every hyper-parameter and the mergelab version."""
    payload = {"kind": "multitask", "base": checkpoint_fingerprint(base_path),
               "tasks": [[t.name, train_split_hash(t)] for t in tasks],
               "config": FinetuneConfig.from_kwargs(**hyper).model_dump(), "mergelab": __version__}  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def get_or_train_multitask(cache_dir: PathLike, base_path: PathLike, tasks: Sequence[Any], threads: int | None = None,
                           progress: bool = True, device: DeviceLike = "auto", **hyper: Any) -> Path:  # fmt: skip
    """The cached multi-task model ``cache_dir/multitask-<key>`` for (base, tasks, hyper-parameters); trained first
    (on ``device``, not part of the key) if absent."""
    target = Path(cache_dir) / f"multitask-{multitask_cache_key(base_path, tasks, **hyper)}"
    if (target / MULTITASK_LOG).is_file() and _complete(target):
        return target
    return finetune_multitask(base_path, tasks, target, threads=threads, progress=progress, device=device, **hyper)


def load_multitask(path: PathLike, label_names: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """``{task: TaskModel}`` of a :func:`finetune_multitask` folder; every task model shares one encoder.

    ``label_names`` (task → the dataset's classes) are checked against each head like ``load_task_model`` does.
    """
    folder = Path(path)
    if not (folder / MULTITASK_LOG).is_file():
        raise CheckpointError(f"{folder} is not a multi-task checkpoint (no {MULTITASK_LOG}); see finetune_multitask")
    record = json.loads((folder / MULTITASK_LOG).read_text())
    pooled = record.get("pooling") == "mean"
    encoder = load_encoder(folder, pooling="mean" if pooled else None)
    out = {}
    for name, entry in record["tasks"].items():
        names = entry["label_names"]
        if label_names is not None and name in label_names:
            check_label_names(names, list(label_names[name]), f"multi-task head '{name}' in {folder}")
        if pooled:
            head = load_linear_head(folder / entry["file"], len(names))
        else:
            head = head_from_state(encoder.model.config, load_file(str(folder / entry["file"])), names)
        out[name] = TaskModel(encoder, head, list(names))
    return out
