"""Where any Hugging Face text sequence classifier splits into encoder side (its base model) and head.

The head is read off the classifier itself: its parameterised children other than the base model
(``classifier``, ``score``, ``classification_head``, ``pre_classifier`` + ``classifier``, ``pooler`` + ``classifier``
…). Each head *shape* has one rule written once: which modules, in which order, with which activation between them,
and which feature of the base model's output the head reads:

| head found | feature | head |
|---|---|---|
| ``classifier`` Linear, base model with a pooler (ALBERT, BERT-likes) | ``pooler`` | ``classifier`` |
| ``classifier`` Linear, no pooler | ``cls`` | ``classifier`` |
| ``classifier`` with ``dense`` + ``out_proj`` (ELECTRA, CamemBERT …) | ``cls`` | dense → its activation (tanh if none) → out_proj |
| ``pooler`` (``dense``) + ``classifier`` Linear (DeBERTa, DeBERTa-v2) | ``cls`` | pooler.dense → ``pooler_hidden_act`` → classifier |
| ``score`` Linear (GPT-2, LLaMA, Qwen2, Mistral, …) | ``last``: last non-padding token | ``score`` |
| ``classification_head`` with ``dense`` + ``out_proj``, encoder-decoder (T5) | ``eos``: decoder state at the last EOS | dense → tanh → out_proj |

``last`` follows the models' own rule (the rightmost token that is not ``pad_token_id``, so left and right padding
both work); HF applies ``score`` per token and then picks that token's logits, which for a Linear head is the same as
picking the hidden state first. ``eos`` runs the whole T5 (encoder and decoder, the decoder fed the input shifted
right as T5ForSequenceClassification does), so the encoder side of T5 is the full ``T5Model``.

A family outside the Architecture table of :mod:`mergelab.models.hf` is accepted only once its split reproduces the
model's own logits on a small padded probe batch; anything else is refused with a CheckpointError naming
``TaskModel.from_modules``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mergelab.core.errors import CheckpointError

FEATURES = ("pooler", "cls", "last", "eos")
ROBERTA_LIKE = frozenset({"roberta", "xlm-roberta", "camembert", "data2vec-text", "xlm-roberta-xl", "xmod",
                          "roberta-prelayernorm"})  # fmt: skip
PROBE_TEXTS = ["alpha beta gamma delta red green blue probe text", "alpha", "cat dog fish sun"]


@dataclass(frozen=True)
class Architecture:
    """Where one model family splits: the feature (``pooler``, ``cls``, ``last``, ``eos``) and the head built from
    the classifier."""

    pooling: str
    head: Callable[[nn.Module], nn.Module]
    head_modules: tuple[str, ...]  # the classifier's attributes holding the head weights
    base_kwargs: Mapping[str, Any] = field(default_factory=dict)  # for the base model (AutoModel)
    position_offset: bool = False  # position ids start after the padding index (RoBERTa)


def refuse(model_type: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"cannot split a '{model_type}' sequence classifier into encoder + head ({why}); wrap the model yourself "
        "with TaskModel.from_modules(encoder, head, label_names)"
    )


def _activation(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _attr(name: str) -> Callable[[nn.Module], nn.Module]:
    return lambda model: getattr(model, name)


def _dense_out(name: str, default: Callable[[], nn.Module] = nn.Tanh) -> Callable[[nn.Module], nn.Module]:
    def build(model: nn.Module) -> nn.Module:
        head = getattr(model, name)
        act = getattr(head, "activation", None)
        return nn.Sequential(head.dense, act if isinstance(act, nn.Module) else default(), head.out_proj)

    return build


def _context_pooler(model: nn.Module) -> nn.Module:
    act = getattr(model.pooler, "config", model.config).pooler_hidden_act
    return nn.Sequential(model.pooler.dense, _activation(act), model.classifier)


def _pre_classifier(model: nn.Module) -> nn.Module:
    return nn.Sequential(model.pre_classifier, nn.ReLU(), model.classifier)


def _base_kwargs(base: nn.Module, pooling: str) -> dict[str, Any]:
    """``add_pooling_layer`` for base models that take it: the pooler is built exactly when the head reads it."""
    if "add_pooling_layer" in inspect.signature(type(base).__init__).parameters:
        return {"add_pooling_layer": pooling == "pooler"}
    return {}


def head_children(model: nn.Module) -> dict[str, nn.Module]:
    """The classifier's children that hold weights, other than its base model (the head's modules)."""
    prefix = model.base_model_prefix
    return {n: m for n, m in model.named_children()
            if n != prefix and any(True for _ in m.parameters())}  # fmt: skip


def candidates(model: nn.Module) -> list[Architecture]:
    """The splits the head modules of ``model`` allow, most likely first (empty: no rule fits)."""
    config = model.config
    base = getattr(model, model.base_model_prefix, None)
    if base is None:
        return []
    children = head_children(model)
    names = set(children)
    offset = config.model_type in ROBERTA_LIKE

    def arch(pooling: str, head: Callable[[nn.Module], nn.Module], modules: tuple[str, ...]) -> Architecture:
        return Architecture(pooling, head, modules, _base_kwargs(base, pooling), offset)

    def dense_out(module: nn.Module) -> bool:
        return isinstance(getattr(module, "dense", None), nn.Linear) and isinstance(
            getattr(module, "out_proj", None), nn.Linear
        )

    if names == {"score"} and isinstance(children["score"], nn.Linear):
        return [arch("last", _attr("score"), ("score",))]
    if names == {"classifier"} and isinstance(children["classifier"], nn.Linear):
        out = [arch("cls", _attr("classifier"), ("classifier",))]
        if getattr(base, "pooler", None) is not None:
            out.insert(0, arch("pooler", _attr("classifier"), ("classifier",)))
        return out
    if names == {"classifier"} and dense_out(children["classifier"]):
        return [arch("cls", _dense_out("classifier"), ("classifier",))]
    if names == {"pooler", "classifier"} and isinstance(children["classifier"], nn.Linear) \
            and isinstance(getattr(children["pooler"], "dense", None), nn.Linear) \
            and hasattr(config, "pooler_hidden_act"):  # fmt: skip
        return [arch("cls", _context_pooler, ("pooler", "classifier"))]
    if names == {"pre_classifier", "classifier"}:
        return [arch("cls", _pre_classifier, ("pre_classifier", "classifier"))]
    if names == {"classification_head"} and dense_out(children["classification_head"]) \
            and getattr(config, "is_encoder_decoder", False):  # fmt: skip
        return [arch("eos", _dense_out("classification_head"), ("classification_head",))]
    return []


def structural_split(model: nn.Module) -> Architecture:
    """The first split the head modules allow (no weights needed: the model may live on the meta device)."""
    found = candidates(model)
    if not found:
        raise refuse(model.config.model_type, f"no rule for its head modules {sorted(head_children(model))}")
    return found[0]


def probe_batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    """A few texts of different lengths, padded as the tokenizer pads."""
    return dict(tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt"))


def verified_split(
    model: nn.Module, tokenizer: Any, features: Callable[[nn.Module, str, dict], torch.Tensor]
) -> Architecture:
    """The first candidate split whose ``head(features(...))`` reproduces ``model``'s own logits on a probe batch."""
    model_type = model.config.model_type
    found = candidates(model)
    if not found:
        raise refuse(model_type, f"no rule for its head modules {sorted(head_children(model))}")
    batch = probe_batch(tokenizer)
    base = getattr(model, model.base_model_prefix)
    problems = []
    with torch.no_grad():
        try:
            own = model(**batch).logits.float()
        except Exception as exc:  # noqa: BLE001  (any failure of the model on the probe means: cannot check)
            raise refuse(model_type, f"its own forward failed on a probe batch: {exc}") from exc
        for arch in found:
            try:
                logits = arch.head(model).eval()(features(base, arch.pooling, batch)).float()
            except Exception as exc:  # noqa: BLE001
                problems.append(f"{arch.pooling}: {type(exc).__name__}: {exc}")
                continue
            if logits.shape == own.shape and torch.allclose(logits, own, atol=1e-4, rtol=1e-3):
                return arch
            problems.append(f"{arch.pooling}: logits differ")
    raise refuse(model_type, "no split reproduces its own logits on a probe batch: " + "; ".join(problems))
