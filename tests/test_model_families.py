"""Any Hugging Face text sequence classifier split into base model + head where its own forward splits.

Each family: a tiny random classifier (hidden 32, 2 layers, random non-zero biases) saved with the tiny word
tokenizer; ``head(encoder.encode_texts(texts))`` must give the model's own eval-mode logits on every text, batched
with padding (left for LLaMA-likes, right otherwise), and an encoder rebuilt from the base-model weights (how merged
encoders are evaluated) must give the same features.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertTokenizerFast
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.core.errors import CheckpointError
from mergelab.models import split as split_module
from mergelab.models.hf import classifier_head_state, head_from_state, load_encoder, load_task_model
from tests._hf_helpers import SPECIAL, VOCAB, WORDS

LABELS = ["neg", "neu", "pos"]
TEXTS = ["alpha beta gamma", "red", "cat dog fish sun moon star rock tree", "blue green", "ice", "gold salt sand",
         "wind rain fire ice sand snow"]  # fmt: skip
DECODERS = {"gpt2", "llama", "qwen2", "mistral"}
# family -> (config class, sequence classifier class, extra config, the feature its head reads)
FAMILIES = {
    "bert": ("BertConfig", "BertForSequenceClassification", {}, "pooler"),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification",
                {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}, "cls"),
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification",
                   {"pad_token_id": 0, "pooler_hidden_size": 32, "pooler_hidden_act": "gelu",
                    "relative_attention": True, "position_buckets": 8, "pos_att_type": ["p2c", "c2p"]}, "cls"),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", {"embedding_size": 16}, "cls"),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 48, "pad_token_id": 0}, "cls"),
    "albert": ("AlbertConfig", "AlbertForSequenceClassification", {"embedding_size": 16, "pad_token_id": 0}, "pooler"),
    "gpt2": ("GPT2Config", "GPT2ForSequenceClassification",
             {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 40, "pad_token_id": 0}, "last"),
    "llama": ("LlamaConfig", "LlamaForSequenceClassification", {"num_key_value_heads": 2, "pad_token_id": 0}, "last"),
    "qwen2": ("Qwen2Config", "Qwen2ForSequenceClassification", {"num_key_value_heads": 2, "pad_token_id": 0}, "last"),
    "mistral": ("MistralConfig", "MistralForSequenceClassification",
                {"num_key_value_heads": 2, "pad_token_id": 0, "head_dim": 8}, "last"),
    "t5": ("T5Config", "T5ForSequenceClassification",
           {"d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_heads": 4, "pad_token_id": 0,
            "eos_token_id": 3, "decoder_start_token_id": 0}, "eos"),
}  # fmt: skip


def tiny_family(kind: str, folder, seed: int = 0):  # noqa: ANN001, ANN201
    """A random classifier of ``kind`` and a word tokenizer padding as the family does, saved to ``folder``."""
    config_name, model_name, extra, _ = FAMILIES[kind]
    labels = dict(num_labels=3, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=40)  # fmt: skip
    config = getattr(transformers, config_name)(**{**common, **extra, **labels})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # random biases and norm scales: a missed bias, norm or activation in the split shows
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
            elif "norm" in name.lower() and param.ndim == 1:
                param.uniform_(0.5, 1.5)
    model.eval().save_pretrained(folder)
    decoder = kind in DECODERS
    extra_kwargs = {"model_input_names": ["input_ids", "attention_mask"]} if decoder or kind == "t5" else {}
    tokenizer = BertTokenizerFast(
        vocab={w: i for i, w in enumerate(SPECIAL + WORDS)},
        padding_side="left" if kind in DECODERS - {"gpt2"} else "right",
        **extra_kwargs,
    )
    tokenizer.save_pretrained(folder)
    return folder


def own_logits(folder, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """The model's own eval-mode logits: one padded batch, and each text alone."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        batched = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
        alone = torch.cat([model(**tokenizer([t], return_tensors="pt")).logits for t in texts])
    return batched, alone


@pytest.fixture(scope="module")
def folders(tmp_path_factory):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("families")
    return {kind: tiny_family(kind, root / kind) for kind in FAMILIES}


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_head_of_features_reproduces_the_models_own_logits(folders, kind):
    folder = folders[kind]
    task = load_task_model(folder, label_names=LABELS)
    assert task.encoder.pooling == FAMILIES[kind][3]
    assert task.encoder.tokenizer.padding_side == ("left" if kind in DECODERS - {"gpt2"} else "right")
    batched, alone = own_logits(folder, TEXTS)
    assert batched.abs().max() > 1e-2  # logits are not trivially zero
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)  # padding does not change the model's answer
    for batch_size in (1, 3, 64):  # batches by length: several paddings, and each text alone
        with torch.no_grad():
            logits = task.head(task.encoder.encode_texts(TEXTS, batch_size=batch_size))
        torch.testing.assert_close(logits, alone, atol=1e-4, rtol=1e-4)
    task.head.train()  # heads have no dropout: train and eval mode agree
    with torch.no_grad():
        torch.testing.assert_close(task.head(task.encoder.encode_texts(TEXTS)), alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_encoder_from_base_weights_gives_the_fine_tuned_features(folders, kind):
    folder = folders[kind]
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    want = load_task_model(folder).encoder.encode_texts(TEXTS, batch_size=3)
    base_state = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    merged = load_encoder(base_state, config_source=folder)  # how merged encoders are built
    torch.testing.assert_close(merged.encode_texts(TEXTS, batch_size=3), want, atol=1e-5, rtol=1e-5)
    prefixed = load_encoder(model.state_dict(), config_source=folder)  # full layout: prefix stripped, head dropped
    torch.testing.assert_close(prefixed.encode_texts(TEXTS, batch_size=3), want, atol=1e-5, rtol=1e-5)
    from_folder = load_encoder(folder)  # the fine-tuned folder itself
    torch.testing.assert_close(from_folder.encode_texts(TEXTS, batch_size=3), want, atol=1e-5, rtol=1e-5)
    assert set(from_folder.model.state_dict()) == set(base_state)


@pytest.mark.parametrize("kind", ["deberta-v2", "electra", "gpt2", "t5"])
def test_head_state_round_trip(folders, kind):
    model = AutoModelForSequenceClassification.from_pretrained(folders[kind]).eval()
    head = head_from_state(model.config, classifier_head_state(model), LABELS)
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(x), load_task_model(folders[kind]).head(x))


def test_a_family_no_rule_fits_is_refused(tmp_path):
    config = transformers.XLNetConfig(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=4, d_inner=48, num_labels=3)
    transformers.XLNetForSequenceClassification(config).save_pretrained(tmp_path)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)}).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"'xlnet'.*TaskModel\.from_modules") as info:
        load_task_model(tmp_path)
    assert "\n" not in str(info.value)


def test_a_split_that_misses_the_models_logits_is_refused(folders, monkeypatch):
    wrong = [split_module.Architecture("cls", lambda m: torch.nn.Sequential(m.classifier.dense, m.classifier.out_proj),
                                       ("classifier",))]  # fmt: skip
    monkeypatch.setattr(split_module, "candidates", lambda model: wrong)  # ELECTRA's gelu left out
    with pytest.raises(CheckpointError, match=r"'electra'.*logits differ.*TaskModel\.from_modules"):
        load_task_model(folders["electra"])


@pytest.mark.parametrize("kind", ["gpt2", "llama", "deberta-v2", "t5"])
def test_eval_cli_current_of_a_fine_tuned_model_is_its_own_accuracy(folders, kind, tmp_path):
    """`mergelab eval --merged FT --finetuned t=FT --data t=D`: the test labels are the model's own predictions
    (transformers, each text alone), so its own accuracy is exactly 1 and Current Eval must say so."""
    folder = folders[kind]
    _, alone = own_logits(folder, TEXTS)
    data = tmp_path / "data"
    data.mkdir()
    train = [(t, LABELS[i % 3]) for i, t in enumerate(TEXTS * 2)]
    test = [(t, LABELS[int(p)]) for t, p in zip(TEXTS, alone.argmax(1), strict=True)]
    for split, rows in (("train", train), ("test", test)):
        (data / f"{split}.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(app, ["eval", "--merged", str(folder), "--finetuned", f"t={folder}", "--data",
                                      f"t={data}", "--protocol", "current", "--cache-dir", str(tmp_path / "cache"),
                                      "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())
    assert row["accuracy"] == 1.0 and row["normalized_accuracy"] == 1.0
