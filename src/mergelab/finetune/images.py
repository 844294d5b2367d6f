"""Image experts: the pretrained EfficientNet-Lite encoder fine-tuned once per image task with a fresh head, cached
by content, with the text experts' recipe (:class:`FinetuneConfig`: AdamW, head lr, warm-up + linear decay, clipped
gradients, a seeded shuffle per epoch, the frozen-encoder probe as the bar and optional LP-FT warm start).

The train images are decoded and preprocessed once (the model's own preprocessing); BatchNorm statistics stay the
pretrained ones (``mergelab.models.efficientnet``). ``max_length`` and ``pooling`` of the recipe do not apply to
images and are ignored (they stay in the recipe's dump, so the cache key is that of the whole recipe). An expert is
a family folder (encoder + ``classifier.*`` head + label names) plus ``mergelab_probe.safetensors`` and
``mergelab_training.json``, written atomically.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergelab import __version__
from mergelab.core.device import CPU, DeviceLike
from mergelab.core.errors import ConfigError, DataError
from mergelab.core.rng import derive_seed
from mergelab.core.sampling import stratified_subsample
from mergelab.finetune.config import FinetuneConfig
from mergelab.finetune.experts import (
    TRAINING_LOG,
    _complete,
    _run_steps,
    _write_probe,
    batch_schedule,
    check_device_and_precision,
    head_shift,
    random_linear_head,
    safe_name,
    seeded_threads,
)
from mergelab.finetune.probe import fit_linear_probe
from mergelab.io.fingerprint import checkpoint_fingerprint
from mergelab.io.writer import atomic_folder
from mergelab.models.efficientnet import (
    EfficientNetEncoder,
    is_efficientnet_folder,
    load_efficientnet_encoder,
    save_efficientnet,
)

PathLike = str | os.PathLike[str]
PREPROCESS_BATCH = 256


def image_train_indices(task: Any, train_size: int | None, seed: int) -> list[int]:
    """The train split's indices, or a seeded stratified subset of ``train_size`` of them."""
    train = task.splits.get("train")
    if train is None or len(train.labels) == 0:
        raise DataError(f"image task '{task.name}' has no training images; add a train split")
    if len(task.label_names) < 2:
        raise DataError(f"image task '{task.name}' has {len(task.label_names)} class(es); classification needs at least 2")
    if train_size is not None and train_size < len(train.labels):
        return [int(i) for i in stratified_subsample(train.labels, train_size, seed)]
    return list(range(len(train.labels)))


def image_train_hash(task: Any) -> str:
    """sha256 over the label names and the train split's labels and image bytes (all an expert sees of its task)."""
    train = task.splits["train"]
    digest = hashlib.sha256(json.dumps([str(n) for n in task.label_names]).encode())
    for index in range(len(train)):
        source = train.sources[index]
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        digest.update(f"{int(train.labels[index])}\t".encode())
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def preprocessed(encoder: EfficientNetEncoder, split: Any, indices: list[int]) -> torch.Tensor:
    """The images ``indices`` of ``split`` decoded and preprocessed once: [N, 3, S, S] on the CPU."""
    sub = split.subset(indices)
    return torch.cat([encoder.preprocess(sub.images(start, start + PREPROCESS_BATCH))
                      for start in range(0, len(sub), PREPROCESS_BATCH)])  # fmt: skip


@torch.no_grad()
def encode_pixels(encoder: nn.Module, pixels: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Eval-mode features of preprocessed ``pixels`` on the encoder's device, back on the CPU."""
    encoder.eval()
    device = next(encoder.parameters()).device
    return torch.cat([encoder(pixels[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(pixels), batch_size)])


def _train_image(base_path: PathLike, task: Any, cfg: FinetuneConfig, indices: list[int], progress: bool,
                 device: torch.device) -> tuple[EfficientNetEncoder, nn.Linear, nn.Linear, dict[str, Any]]:  # fmt: skip
    """Encoder + Linear head fine-tuned from the probe (or a random head) on ``device``: (encoder, head, probe,
    log), back on the CPU."""
    seed = cfg.task_seed(task.name)
    encoder = load_efficientnet_encoder(base_path, base_path)
    pixels = preprocessed(encoder, task.splits["train"], indices)
    labels = torch.tensor([int(task.splits["train"].labels[i]) for i in indices], dtype=torch.long)
    encoder.to(device)
    probe, probe_info = fit_linear_probe(encode_pixels(encoder, pixels), labels.tolist(), len(task.label_names), seed=seed)
    head = copy.deepcopy(probe) if cfg.head_init == "probe" else random_linear_head(
        probe.in_features, len(task.label_names), derive_seed(seed, "head"))  # fmt: skip
    initial = head.weight.detach().clone()
    model = nn.Sequential(encoder, head.to(device))

    def loss_of(_: int, idx: list[int]) -> torch.Tensor:
        return nn.functional.cross_entropy(model(pixels[idx].to(device)).float(), labels[idx].to(device))

    steps = [(0, idx) for idx in batch_schedule(len(indices), cfg.batch_size, cfg.epochs, derive_seed(seed, "batches"))]
    log = _run_steps(model, steps, loss_of, cfg, f"fine-tuning {task.name}", progress, heads=[head])
    model.to(CPU)  # deliberate: the expert is saved (and used) from the CPU
    log.update(probe=probe_info, head_init=cfg.head_init, head_shift=head_shift(initial, head.weight.detach()))
    return encoder.eval(), head.eval(), probe, log


def finetune_image_expert(base_path: PathLike, task: Any, out_dir: PathLike, *, threads: int | None = None,
                          progress: bool = True, device: DeviceLike = "auto", **hyper: Any) -> Path:  # fmt: skip
    """Fine-tune the pretrained image base ``base_path`` (an EfficientNet-Lite folder) on ``task``'s train split;
    save the expert to ``out_dir`` (replaced atomically) with its probe and training log."""
    cfg = FinetuneConfig.from_kwargs(**hyper)
    if cfg.precision != "fp32":
        raise ConfigError(f"image experts train in fp32; precision {cfg.precision!r} is for text experts")
    where = check_device_and_precision(device, cfg)
    if not is_efficientnet_folder(base_path):
        raise ConfigError(f"image fine-tuning needs an EfficientNet-Lite base folder (base 'efficientnet-lite0'); "
                          f"{base_path} is not one")  # fmt: skip
    indices = image_train_indices(task, cfg.train_size, cfg.seed)
    with seeded_threads(cfg.task_seed(task.name), threads, where):
        encoder, head, probe, log = _train_image(base_path, task, cfg, indices, progress, where)
        used_threads = torch.get_num_threads()
    record = {"task": task.name, "examples": len(indices), "config": cfg.model_dump(), "threads": used_threads,
              "device": str(where), "modality": "image", **log}  # fmt: skip
    with atomic_folder(Path(out_dir), force=True) as tmp:
        save_efficientnet(tmp, encoder, head, [str(n) for n in task.label_names])
        _write_probe(tmp, probe)
        (tmp / TRAINING_LOG).write_text(json.dumps(record, indent=1))
    return Path(out_dir)


def image_expert_cache_key(base_path: PathLike, task: Any, **hyper: Any) -> str:
    """Hash of all that determines an image expert: base weights and config, the task's name, train images and
    label names, every hyper-parameter (defaults filled in) and the mergelab version."""
    payload = {"kind": "image-expert", "base": checkpoint_fingerprint(base_path), "task": str(task.name),
               "train": image_train_hash(task), "config": FinetuneConfig.from_kwargs(**hyper).model_dump(),
               "mergelab": __version__}  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def get_or_train_image_expert(cache_dir: PathLike, base_path: PathLike, task: Any, threads: int | None = None,
                              progress: bool = True, device: DeviceLike = "auto", **hyper: Any) -> Path:  # fmt: skip
    """The cached image expert ``cache_dir/<task>-<key>``; trained first (on ``device``, not in the key) if absent."""
    target = Path(cache_dir) / f"{safe_name(task.name)}-{image_expert_cache_key(base_path, task, **hyper)}"
    if _complete(target):
        return target
    return finetune_image_expert(base_path, task, target, threads=threads, progress=progress, device=device, **hyper)
