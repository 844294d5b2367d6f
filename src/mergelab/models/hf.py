"""Hugging Face sequence classifiers split into encoder + head exactly where the model's own forward splits.

| model_type | feature fed to the head | head (eval mode: dropout is the identity) |
|---|---|---|
| bert (incl. MiniLM) | ``pooler_output`` (the pooler is encoder weights, merged) | ``classifier`` (Linear) |
| roberta, xlm-roberta | ``last_hidden_state[:, 0]`` | ``classifier``: dense → tanh → out_proj |
| distilbert | ``last_hidden_state[:, 0]`` | ``pre_classifier`` → ReLU → ``classifier`` |

Any other text sequence classifier (ALBERT, ELECTRA, DeBERTa-v2, GPT-2, LLaMA, Qwen2, Mistral, T5, …) is split by
the rules of :mod:`mergelab.models.split`: the head modules are found on the model itself, the feature is what those
modules receive in the model's own forward (``pooler``, ``cls``, ``last``: the last non-padding token, ``eos``: T5's
decoder state at the last EOS), and the split is accepted only if it reproduces the model's logits on a probe batch.

A *pooled classifier* (what ``mergelab`` fine-tunes by default, the FT-Classifier paper's architecture) is a base
encoder folder that ``transformers.AutoModel`` loads as it is, plus ``mergelab_head.json`` (format, pooling, label
names) and ``mergelab_head.safetensors`` (one Linear: ``weight`` [C, d], ``bias`` [C]); its feature is the mean of
the last hidden states over non-padding tokens (``pooling: mean``, all-MiniLM-L6-v2's own sentence embedding).

Heads are plain ``[B, d] → [B, C]`` modules without dropout, so ``head(encoder(x))`` equals the fine-tuned model's
own logits in eval mode, and a head that a protocol re-trains behaves the same in train and eval mode.
Weights are used in float32 whatever dtype they were saved in.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from mergelab.core.config import DEFAULT_MAX_LENGTH
from mergelab.core.device import DEFAULT_PRECISION, autocast, module_device
from mergelab.core.errors import CheckpointError, ConfigError, DataError
from mergelab.models.split import ROBERTA_LIKE, Architecture, refuse, structural_split, verified_split
from mergelab.models.task_model import TaskModel, check_label_names

PathLike = str | os.PathLike[str]


def _bert_head(model: nn.Module) -> nn.Module:
    return model.classifier


def _roberta_head(model: nn.Module) -> nn.Module:
    head = model.classifier  # RobertaClassificationHead: dropout, dense, tanh, dropout, out_proj on x[:, 0]
    return nn.Sequential(head.dense, nn.Tanh(), head.out_proj)


def _distilbert_head(model: nn.Module) -> nn.Module:
    return nn.Sequential(model.pre_classifier, nn.ReLU(), model.classifier)


ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType({
    "bert": Architecture("pooler", _bert_head, ("classifier",), {"add_pooling_layer": True}),
    "roberta": Architecture("cls", _roberta_head, ("classifier",), {"add_pooling_layer": False}, True),
    "xlm-roberta": Architecture("cls", _roberta_head, ("classifier",), {"add_pooling_layer": False}, True),
    "distilbert": Architecture("cls", _distilbert_head, ("pre_classifier", "classifier")),
})  # fmt: skip


def architecture(model_type: str) -> Architecture:
    """The encoder/head split of ``model_type``; CheckpointError for families not in the table."""
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"model type '{model_type}' is not supported (supported: {', '.join(ARCHITECTURES)}); wrap the model "
            "yourself with TaskModel.from_modules(encoder, head, label_names)"
        )
    return ARCHITECTURES[model_type]


POOLINGS = ("pooler", "cls", "mean", "last", "eos")
POOLED_HEAD_CONFIG = "mergelab_head.json"
POOLED_HEAD_WEIGHTS = "mergelab_head.safetensors"
POOLED_FORMAT = "mergelab-pooled-classifier"


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    """Per row, the rightmost position where ``mask`` is true (0 when none)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.to(torch.long)).argmax(-1)


def pool(output: Any, attention_mask: torch.Tensor | None, pooling: str, *, input_ids: torch.Tensor | None = None,
         pad_token_id: int | None = None, eos_token_id: int | None = None) -> torch.Tensor:  # fmt: skip
    """The feature [B, d] of a base model's ``output``: ``pooler_output``, the first token, the mean of the last
    hidden states over non-padding tokens (all tokens when no mask is given), the last non-padding token (``last``:
    the rightmost token that is not ``pad_token_id`` as decoder LMs' classifiers pick it, else the rightmost
    attended token, else the last) or the last EOS token (``eos``, T5's classifier; needs ``input_ids``)."""
    if pooling == "pooler":
        if getattr(output, "pooler_output", None) is None:
            raise CheckpointError("this encoder has no pooler but its head reads pooler_output")
        return output.pooler_output
    hidden = output.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "last":
        if input_ids is not None and pad_token_id is not None:
            return hidden[rows, _last_index(input_ids != pad_token_id)]
        if attention_mask is not None:
            return hidden[rows, _last_index(attention_mask != 0)]
        return hidden[:, -1]
    if pooling == "eos":
        if input_ids is None or eos_token_id is None:
            raise ConfigError("the eos feature needs input_ids and the config's eos_token_id")
        eos = input_ids == eos_token_id
        if not bool(eos.any(dim=1).all()):
            raise DataError(f"every text must end with the EOS token (id {eos_token_id}) for this classifier; "
                            "tokenize with the model's own tokenizer")  # fmt: skip
        return hidden[rows, _last_index(eos)]
    if pooling != "mean":
        raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def max_positions(config: Any) -> int:
    """The longest token sequence the model's position embeddings accept."""
    limit = int(getattr(config, "max_position_embeddings", None) or 512)
    known = ARCHITECTURES.get(config.model_type)
    if known.position_offset if known is not None else config.model_type in ROBERTA_LIKE:
        limit -= int(config.pad_token_id or 0) + 1
    return limit


def split_features(base: nn.Module, pooling: str, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The feature [B, d] a classifier's head reads, from its base model on a tokenised ``batch``; for ``eos`` an
    encoder-decoder base is fed the input shifted right as its decoder input (as T5ForSequenceClassification)."""
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    batch = dict(batch)
    if pooling == "eos" and "decoder_input_ids" not in batch and hasattr(base, "_shift_right"):
        batch["decoder_input_ids"] = base._shift_right(batch["input_ids"])
    return pool(base(**batch), batch.get("attention_mask"), pooling, input_ids=batch.get("input_ids"),
                pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)  # fmt: skip


def _meta_classifier(config: Any) -> nn.Module:
    """The family's sequence classifier for ``config`` on the meta device (no memory, no weights)."""
    from transformers import AutoModelForSequenceClassification

    try:
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(copy.deepcopy(config))
    except (ValueError, KeyError) as exc:
        raise refuse(config.model_type, "transformers has no sequence classifier for it") from exc


def split_of_config(config: Any) -> Architecture:
    """The split of ``config``'s family: the Architecture table, else the rule its head modules fit (no weights)."""
    if config.model_type in ARCHITECTURES:
        return ARCHITECTURES[config.model_type]
    return structural_split(_meta_classifier(config))


def split_of_model(model: nn.Module, tokenizer: Any) -> Architecture:
    """The split of a loaded classifier: the table, else the rule that reproduces its logits on a probe batch."""
    if model.config.model_type in ARCHITECTURES:
        return ARCHITECTURES[model.config.model_type]
    return verified_split(model, tokenizer, split_features)


def _pad_like_model(tokenizer: Any, config: Any) -> Any:
    """A tokenizer without a pad token (GPT-2, LLaMA) pads with the config's ``pad_token_id``."""
    pad = getattr(config, "pad_token_id", None)
    if getattr(tokenizer, "pad_token", "") is None and pad is not None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(pad))
    return tokenizer


class TextEncoder(nn.Module):
    """A base model (``AutoModel``) and its tokenizer, returning the feature [B, d] the task head consumes."""

    def __init__(self, model: nn.Module, tokenizer: Any, pooling: str) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got '{pooling}'")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pooling = pooling

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        if self.pooling in ("pooler", "cls", "mean"):
            return pool(self.model(**batch), batch.get("attention_mask"), self.pooling)
        return split_features(self.model, self.pooling, batch)

    def max_length(self, requested: int) -> int:
        """``requested`` capped by what the position embeddings accept."""
        if requested < 2:
            raise ConfigError(f"max_length must be at least 2 (room for the special tokens), got {requested}")
        return min(int(requested), max_positions(self.model.config))

    @torch.no_grad()  # not inference_mode: protocols train heads on these features afterwards
    def encode_texts(self, texts: list[str], max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 64,
                     progress: Callable[[int], None] | None = None,
                     precision: str = DEFAULT_PRECISION) -> torch.Tensor:  # fmt: skip
        """float32 features [N, d] of ``texts`` in order, on the CPU, in eval mode without gradients.

        Texts are tokenised once (truncated to ``max_length``), batched by length so little padding is computed,
        padded per batch, and put back in the original order. ``progress(n)`` is called after each batch. The
        forward passes run on the model's device (``precision``: bf16 / fp16 autocast there; fp32: none).
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.eval()
        texts = [str(t) for t in texts]
        if not texts:
            return torch.empty(0, int(self.model.config.hidden_size))
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length(max_length))
        order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
        device = module_device(self.model)
        out: torch.Tensor | None = None
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = self.tokenizer.pad({k: [encoded[k][i] for i in idx] for k in encoded}, return_tensors="pt")
            with autocast(device, precision):
                features = self(**{k: v.to(device) for k, v in batch.items()})
            features = features.float().cpu()  # deliberate: features are returned (and cached) on the CPU
            if out is None:
                out = torch.empty(len(texts), features.shape[1])
            out[torch.tensor(idx)] = features
            if progress is not None:
                progress(len(idx))
        assert out is not None
        return out


def _require_folder(path: PathLike, what: str) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{what} {folder} is not a Hugging Face model folder (no config.json)")
    return folder


def load_tokenizer(source: PathLike) -> Any:
    """The tokenizer saved in a model folder (never downloaded)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot load a tokenizer from {source} ({exc}); save it next to the weights with "
            "tokenizer.save_pretrained(folder)"
        ) from exc


def head_label_names(config: Any) -> list[str]:
    """The class names of a classifier config, in class-index order."""
    id2label = {int(k): str(v) for k, v in (config.id2label or {}).items()}
    if sorted(id2label) != list(range(len(id2label))):
        raise CheckpointError(f"id2label of the config has class ids {sorted(id2label)}, expected 0..C-1")
    return [id2label[i] for i in range(len(id2label))]


def is_pooled_classifier(path: PathLike) -> bool:
    """Whether ``path`` is a pooled-classifier folder (base encoder + ``mergelab_head.json``)."""
    return (Path(path) / POOLED_HEAD_CONFIG).is_file()


def read_pooled_head_config(folder: Path) -> dict[str, Any]:
    """The validated ``mergelab_head.json`` of a pooled classifier."""
    try:
        meta = json.loads((folder / POOLED_HEAD_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / POOLED_HEAD_CONFIG} is not valid JSON ({exc}); re-save the expert") from exc
    if meta.get("format") != POOLED_FORMAT or meta.get("pooling") not in POOLINGS or not meta.get("label_names"):
        raise CheckpointError(
            f"{folder / POOLED_HEAD_CONFIG} is not a {POOLED_FORMAT} header (needs format, pooling in "
            f"{POOLINGS} and label_names); re-save the expert with mergelab.models.hf.save_pooled_classifier"
        )
    return meta


def save_pooled_classifier(folder: PathLike, encoder: TextEncoder, head: nn.Linear, label_names: list[str],
                           extra: Mapping[str, Any] | None = None) -> None:  # fmt: skip
    """Write ``encoder`` (base layout, loadable with ``AutoModel``), its tokenizer and ``head`` into ``folder``."""
    from safetensors.torch import save_file

    names = [str(n) for n in label_names]
    if not isinstance(head, nn.Linear) or head.out_features != len(names):
        raise ConfigError(f"a pooled classifier's head must be nn.Linear(d, {len(names)}), got {head}")
    out = Path(folder)
    encoder.model.save_pretrained(out)
    encoder.tokenizer.save_pretrained(out)
    state = {"weight": head.weight.detach().float().cpu().contiguous(),  # deliberate: saved from any device
             "bias": head.bias.detach().float().cpu().contiguous()}  # fmt: skip
    save_file(state, str(out / POOLED_HEAD_WEIGHTS))
    meta = {"format": POOLED_FORMAT, "version": 1, "pooling": encoder.pooling, "label_names": names,
            "hidden_size": int(head.in_features), **dict(extra or {})}  # fmt: skip
    (out / POOLED_HEAD_CONFIG).write_text(json.dumps(meta, indent=1))


def load_linear_head(file: Path, num_classes: int) -> nn.Linear:
    """An ``nn.Linear`` from a safetensors file holding ``weight`` [C, d] and ``bias`` [C]."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(file))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc}); re-save the expert") from exc
    weight, bias = state.get("weight"), state.get("bias")
    if weight is None or bias is None or weight.ndim != 2 or tuple(bias.shape) != (weight.shape[0],):
        raise CheckpointError(f"{file} must hold 'weight' [C, d] and 'bias' [C]; got {sorted(state)}")
    if weight.shape[0] != num_classes:
        raise CheckpointError(f"{file} has {weight.shape[0]} classes but its header names {num_classes}")
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return head.eval()


def load_pooled_classifier(path: PathLike, label_names: list[str] | None = None) -> TaskModel:
    """A pooled-classifier folder (module doc) as encoder + head; ``label_names`` are checked as for HF heads."""
    folder = Path(path)
    meta = read_pooled_head_config(folder)
    head_names = [str(n) for n in meta["label_names"]]
    if label_names is not None:
        check_label_names(head_names, list(label_names), f"fine-tuned model {folder}")
    encoder = load_encoder(folder, folder, pooling=meta["pooling"])
    head = load_linear_head(folder / POOLED_HEAD_WEIGHTS, len(head_names))
    width = int(encoder.model.config.hidden_size)
    if head.in_features != width:
        raise CheckpointError(f"{folder}: the head reads {head.in_features} features but the encoder gives {width}")
    names = [str(n) for n in label_names] if label_names is not None else head_names
    return TaskModel(encoder, head, names)


def load_task_model(path: PathLike, label_names: list[str] | None = None) -> TaskModel:
    """A fine-tuned classifier folder as encoder + head: a pooled classifier (module doc) or an
    ``AutoModelForSequenceClassification`` folder.

    ``label_names`` (the dataset's classes) must agree with the head's ``id2label`` (DataError otherwise).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = _require_folder(path, "fine-tuned model")
    if is_pooled_classifier(folder):
        return load_pooled_classifier(folder, label_names)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    split_of_config(config)  # refuse a family that cannot be split before loading its weights
    head_names = head_label_names(config)
    if label_names is not None:
        check_label_names(head_names, list(label_names), f"fine-tuned model {folder}")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True
        )
    except OSError as exc:
        raise CheckpointError(f"{folder} has no loadable classifier weights ({exc})") from exc
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise CheckpointError(
            f"{folder} is not a complete fine-tuned classifier: {len(missing)} tensors were missing and would be "
            f"random ({sorted(missing)[:5]}); pass the fine-tuned checkpoint, not the pretrained base"
        )
    model = model.float().eval()
    tokenizer = _pad_like_model(load_tokenizer(folder), model.config)
    arch = split_of_model(model, tokenizer)
    encoder = TextEncoder(getattr(model, model.base_model_prefix), tokenizer, arch.pooling)
    names = [str(n) for n in label_names] if label_names is not None else head_names
    return TaskModel(encoder, arch.head(model).eval(), names)


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys in base layout: a full classifier's ``prefix.*`` keys without the prefix (its head dropped)."""
    marker = prefix + "."
    if any(k.startswith(marker) for k in state):
        return {k[len(marker) :]: v for k, v in state.items() if k.startswith(marker)}
    return dict(state)


def load_base_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a base-layout (or prefixed) state dict into a base model, converting dtypes; every tensor is required."""
    expected = model.state_dict()
    source = _strip_prefix(state, getattr(model, "base_model_prefix", ""))
    missing = sorted(k for k in expected if k not in source)
    if missing:
        raise CheckpointError(
            f"the state dict lacks encoder tensors {missing[:5]} ({len(missing)} in all) that a "
            f"{type(model).__name__} needs; pass the whole encoder (base layout or with its '{model.base_model_prefix}.'"
            " prefix)"
        )
    loaded = {}
    for key, ref in expected.items():
        value = source[key]
        if tuple(value.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"encoder tensor '{key}' has shape {tuple(value.shape)} but the config expects {tuple(ref.shape)}; "
                "the state dict and the config come from different models"
            )
        loaded[key] = value.detach().to(device=ref.device, dtype=ref.dtype)
    model.load_state_dict(loaded, strict=True)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has neither config.json nor *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def load_encoder(source: PathLike | Mapping[str, torch.Tensor], config_source: PathLike | Any | None = None,
                 tokenizer: PathLike | Any | None = None, pooling: str | None = None) -> TextEncoder:  # fmt: skip
    """The base encoder (``AutoModel``, float32, eval mode) with the feature its task heads read.

    ``source``: a model folder in any layout (bare base such as all-MiniLM-L6-v2, or a fine-tuned classifier), a
    folder of safetensors weights without a config, or an in-memory state dict in base layout (a ``bert.``-style
    prefix is stripped if present) — merged encoders are evaluated without being written to disk.
    ``config_source``: a folder (or a ``PretrainedConfig``) giving the architecture when ``source`` has no config,
    and the tokenizer unless ``tokenizer`` is given; defaults to ``source`` when that is a folder.
    The pooler is built (and required) exactly when the family's head reads ``pooler_output``.
    ``pooling`` overrides the family's feature (``mean`` for pooled classifiers); default: the family's own.
    """
    from transformers import AutoConfig, AutoModel, PretrainedConfig

    folder = None if isinstance(source, Mapping) else Path(source)
    if folder is not None and not folder.exists():
        raise CheckpointError(f"encoder checkpoint {folder} does not exist")
    given_config = config_source if isinstance(config_source, PretrainedConfig) else None
    config_folder = None if given_config is not None else (config_source if config_source is not None else folder)
    if given_config is None and config_folder is None:
        raise ConfigError("load_encoder needs config_source (a model folder) when the encoder is a state dict")
    tokenizer = tokenizer if tokenizer is not None else config_folder
    if tokenizer is None:
        raise ConfigError("pass tokenizer= (a folder or a tokenizer) when config_source is a PretrainedConfig")
    if isinstance(tokenizer, str | os.PathLike):
        tokenizer = load_tokenizer(tokenizer)

    if folder is not None and (folder / "config.json").is_file():
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        arch = _encoder_split(config, pooling)
        model, info = AutoModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                                **arch.base_kwargs)  # fmt: skip
        missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
        if missing:
            raise CheckpointError(
                f"{folder} lacks encoder tensors {sorted(missing)[:5]} ({len(missing)} in all) that would be "
                "random; save the whole encoder (the pooler too for BERT-family models)"
            )
    else:
        if given_config is None:
            given_config = AutoConfig.from_pretrained(str(_require_folder(config_folder, "config source")),
                                                      local_files_only=True)  # fmt: skip
        config = given_config
        arch = _encoder_split(config, pooling)
        model = AutoModel.from_config(config, **arch.base_kwargs)
        load_base_state(model, _read_weights(folder) if folder is not None else source)
    if pooling is None and folder is not None and is_pooled_classifier(folder):
        pooling = read_pooled_head_config(folder)["pooling"]  # a pooled classifier's encoder gives its own feature
    return TextEncoder(model.float().eval(), _pad_like_model(tokenizer, config), pooling or arch.pooling)


def _encoder_split(config: Any, pooling: str | None) -> Architecture:
    """The split deciding the base model's kwargs and default feature; a given ``mean``/``cls`` feature needs none."""
    if config.model_type in ARCHITECTURES or pooling not in ("mean", "cls"):
        return split_of_config(config)
    try:
        return split_of_config(config)
    except CheckpointError:  # a family without a classifier rule still gives its hidden states
        return Architecture(pooling, lambda model: model, ())


def classifier_head_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The head tensors of an ``AutoModelForSequenceClassification`` (keys as in the classifier)."""
    arch = split_of_config(model.config)
    return {f"{name}.{k}": v.detach().cpu().contiguous()  # deliberate: for saving, from any device
            for name in arch.head_modules for k, v in getattr(model, name).state_dict().items()}  # fmt: skip


def head_from_state(config: Any, state: Mapping[str, torch.Tensor], label_names: list[str]) -> nn.Module:
    """A head module (as ``load_task_model`` gives) rebuilt from ``classifier_head_state`` tensors, float32."""
    from transformers import AutoModelForSequenceClassification

    arch = split_of_config(config)
    names = [str(n) for n in label_names]
    config = copy.deepcopy(config)
    config.num_labels = len(names)
    config.id2label, config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    with torch.device("meta"):  # the encoder part is never materialised
        model = AutoModelForSequenceClassification.from_config(config)
    for name in arch.head_modules:
        module = getattr(model, name).to_empty(device="cpu")  # deliberate: loaded heads live on the CPU
        part = {k[len(name) + 1 :]: v.float() for k, v in state.items() if k.startswith(name + ".")}
        try:
            module.load_state_dict(part, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"the head tensors do not fit a {config.model_type} head with {len(names)} "
                                  f"classes: {exc}") from exc  # fmt: skip
    return arch.head(model).float().eval()


def label_names_of(path: PathLike) -> list[str]:
    """The id2label names of a classifier checkpoint's config."""
    folder = _require_folder(path, "classifier")
    if is_pooled_classifier(folder):
        return [str(n) for n in read_pooled_head_config(folder)["label_names"]]
    config = json.loads((folder / "config.json").read_text())
    id2label = config.get("id2label") or {}
    if not id2label:
        raise DataError(f"{folder}/config.json has no id2label; it is not a sequence classifier")
    return [str(id2label[str(i)]) for i in range(len(id2label))]
