"""A PEFT LoRA classifier adapter as a full expert: applied to its base and saved once as a plain classifier folder.

A benchmark expert must be a classifier whose features and head the protocols read, so an adapter given as an expert
(``experts: {task: adapter folder}``) is materialised: the base is loaded as the family's sequence classifier with the
task's labels, PEFT applies the adapter (its LoRA factors and the head it saved, ``modules_to_save``) and
``merge_and_unload()`` folds ΔW = s·B·A into the weights, the way PEFT itself defines the adapted model. The folder is
written atomically under a name keyed by the adapter's and the base's content and the labels, so a rerun reuses it.
The streaming merge engine does not need this: it reads adapters directly (``mergelab.io.adapter``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from transformers import AutoModelForSequenceClassification

from mergelab.core.errors import CheckpointError, ConfigError
from mergelab.io.adapter import check_supported, open_adapter_weights, read_adapter_config, resolve_base
from mergelab.io.fingerprint import checkpoint_fingerprint
from mergelab.io.writer import atomic_folder
from mergelab.models.split import head_children

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json")  # fmt: skip


def lora_expert_key(adapter: Path, base: Path, label_names: Sequence[str]) -> str:
    """What determines the materialised expert: the adapter's and the base's content, and the labels."""
    parts = [checkpoint_fingerprint(adapter), checkpoint_fingerprint(base), json.dumps(list(label_names))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def check_saves_head(task: str, adapter: Path, head_names: Sequence[str]) -> None:
    """The adapter must carry the classifier's head (``modules_to_save``): otherwise the head would be random."""
    saved = open_adapter_weights(adapter).keys()
    if not any(f".{head}." in name or name.startswith(f"{head}.") for name in saved for head in head_names):
        raise ConfigError(
            f"expert '{task}' ({adapter}) is a LoRA adapter that saves no classification head ({', '.join(head_names)}); "
            "train it with task_type='SEQ_CLS' (or modules_to_save=[...the head...]) so that its head is saved"
        )


def apply_adapter(task: str, adapter: Path, base: Path, label_names: Sequence[str]):  # noqa: ANN201
    """The base as a sequence classifier with the task's labels, the adapter applied and merged in (PEFT)."""
    try:
        from peft import PeftModel  # lazy: an optional dependency, needed only for adapter experts
    except ImportError:
        raise ConfigError(f"expert '{task}' is a LoRA adapter; materialising it needs PEFT: pip install peft") from None
    labels = list(label_names)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
    )
    check_saves_head(task, adapter, list(head_children(model)))
    try:
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except RuntimeError as exc:  # PEFT/torch: a saved head of another width than the task's labels
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"expert '{task}' ({adapter}) does not fit the base with the task's {len(labels)} "
                              f"labels: {first}; give the adapter trained for this task") from None  # fmt: skip


def materialise_lora_classifier(task: str, adapter: str | Path, base: str | Path, label_names: Sequence[str],
                                out_root: str | Path) -> Path:  # fmt: skip
    """The folder of the full classifier that LoRA ``adapter`` on ``base`` is, with ``label_names``: written once
    under ``out_root`` (atomically, keyed by content), then reused. The adapter's recorded base must be ``base``."""
    adapter, base = Path(adapter), Path(base)
    config = read_adapter_config(adapter)
    check_supported(config, adapter)
    resolve_base(adapter, config, base)  # its base_model_name_or_path, when a local folder, must be this base
    out = Path(out_root) / f"lora-{task}-{lora_expert_key(adapter, base, label_names)}"
    if (out / "config.json").is_file():
        return out
    model = apply_adapter(task, adapter, base, label_names)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
    return out
