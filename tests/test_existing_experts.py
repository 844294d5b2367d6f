"""The benchmark on experts a config gives (``experts:``): same rows as fine-tuning them, no fine-tuning, and one
clear error per bad expert (labels, architecture, tensors, a copy of the base, a Hub id offline, a missing path)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification

from mergelab.bench import pool as pool_module
from mergelab.bench.config import ExperimentConfig, builtin_config, load_experiment_config
from mergelab.bench.pool import load_expert_pool
from mergelab.bench.runner import run_benchmark
from mergelab.core.errors import CheckpointError, ConfigError, DataError
from mergelab.finetune import experts as finetune_module
from mergelab.io.hub import looks_like_hub_id
from tests._text_helpers import (
    SPECIAL,
    WORDS,
    make_task,
    tiny_bare_base,
    tiny_classifier,
    write_task_folder,
    write_tokenizer,
)

TASKS = ("t0", "t1", "t2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny bare base, three tiny tasks, and one benchmark run that fine-tuned their experts."""
    root = tmp_path_factory.mktemp("existing")
    base = tiny_bare_base(root)
    tasks = {name: write_task_folder(make_task(name, num_classes=2 + i, per_class=10, seed=i), root / name)
             for i, name in enumerate(TASKS)}  # fmt: skip
    config = {
        "base": str(base),
        "tasks": [{"name": name, "path": str(path)} for name, path in tasks.items()],
        "data": {"fewshot_pool_per_class": 4},
        "finetune": {"epochs": 3, "lr": 3.0e-3, "max_length": 16, "batch_size": 8},
        "methods": [{"name": "weight_average"}, {"name": "task_arithmetic", "grid": {"scale": [0.3, 1.0]}}],
        "protocols": ["current", "knn"],
        "shots": [1],
        "seeds": 2,
        "threads": 1,
    }  # fmt: skip
    (root / "finetuned.yaml").write_text(yaml.safe_dump(config))
    run_benchmark(load_experiment_config(root / "finetuned.yaml"), root / "run", root / "cache", log=lambda m: None,
                  report=False)  # fmt: skip
    folders = {name: next((root / "cache" / "experts").glob(f"{name}-*")) for name in TASKS}
    return {"root": root, "base": base, "config": config, "experts": folders}


def experts_config(trained: dict, experts: dict[str, str]) -> ExperimentConfig:
    """The trained run's config with ``experts:`` instead of fine-tuning."""
    return ExperimentConfig.model_validate({**trained["config"], "experts": experts})


def copied_experts(trained: dict, folder: Path) -> dict[str, str]:
    """Copies of the fine-tuned expert folders (other paths, same content)."""
    return {name: str(shutil.copytree(path, folder / f"my-{name}")) for name, path in trained["experts"].items()}


def no_finetuning(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("an expert was fine-tuned although the config gives them")

    for name in ("finetune_expert", "get_or_train_expert"):
        monkeypatch.setattr(finetune_module, name, fail)
    monkeypatch.setattr(pool_module, "get_or_train_expert", fail)


def stored(run: Path) -> pd.DataFrame:
    with sqlite3.connect(run / "results.sqlite") as conn:
        return pd.read_sql("SELECT * FROM results ORDER BY key", conn)


def test_given_experts_give_the_rows_of_fine_tuning_them_without_fine_tuning(trained, tmp_path, monkeypatch):
    no_finetuning(monkeypatch)
    logged: list[str] = []
    cfg = experts_config(trained, copied_experts(trained, tmp_path))
    run_benchmark(cfg, tmp_path / "run", tmp_path / "cache", log=logged.append, report=False)
    assert not (tmp_path / "cache" / "experts").exists() or not any((tmp_path / "cache" / "experts").iterdir())
    assert sum("(given, not fine-tuned)" in line for line in logged) == len(TASKS)
    mine, theirs = stored(tmp_path / "run"), stored(trained["root"] / "run")
    assert len(mine) == len(theirs) > 0
    assert {"finetuned", "pretrained", "merged"} <= set(mine["model"])
    pd.testing.assert_frame_equal(mine, theirs)  # every column, the keys too: they hang on content, not paths
    csv_mine, csv_theirs = (pd.read_csv(r / "results.csv") for r in (tmp_path / "run", trained["root"] / "run"))
    pd.testing.assert_frame_equal(csv_mine, csv_theirs)


def bert_classifier(folder: Path, num_labels: int, **changes: int) -> Path:
    """A tiny BERT classifier like the experts' family, with some dimensions changed."""
    torch.manual_seed(1)
    id2label = {i: f"class{i}" for i in range(num_labels)}
    dims = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48,
            "max_position_embeddings": 64, **changes}  # fmt: skip
    config = BertConfig(vocab_size=len(SPECIAL) + len(WORDS), num_labels=num_labels, id2label=id2label,
                        label2id={v: k for k, v in id2label.items()}, **dims)  # fmt: skip
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def base_copy(trained: dict, folder: Path) -> Path:
    """Expert t0's folder (head, labels) with the base's encoder weights: a copy of the base dressed as an expert."""
    target = Path(shutil.copytree(trained["experts"]["t0"], folder))
    shutil.copy(trained["base"] / "model.safetensors", target / "model.safetensors")
    return target


@pytest.mark.parametrize(
    "case,error,message",
    [
        ("labels", DataError, r"the head has 3 classes .* but the data has 2 classes"),
        ("architecture", CheckpointError, r"expert 't0' \(.*\) is a roberta model but the base .* is bert; give experts "
                                          r"fine-tuned from the base"),  # fmt: skip
        ("shapes", CheckpointError, r"expert 't0' .*: tensor '.*' has shape \[40.*\] but the base's has \[48.*\]; it is "
                                    r"not a fine-tune of the base"),  # fmt: skip
        ("tensors", CheckpointError, r"expert 't0' .* lacks \d+ of the base's \d+ tensors \(\['encoder\.layer\.1\..*"
                                     r"it is not a fine-tune of the base"),  # fmt: skip
        ("copy", CheckpointError, r"expert 't0' .* has exactly the base's weights: it is a copy of the base, not a "
                                  r"fine-tuned expert"),  # fmt: skip
        ("missing", CheckpointError, r"expert 't0' \./no/such/expert does not exist; check the path"),
        ("adapter", ConfigError, r"expert 't0' .* is a LoRA adapter that saves no classification head"),
        ("feature", ConfigError, r"the experts read different features \{'t0': 'pooler', 't1': 'mean', 't2': 'mean'\}"),
    ],
)
def test_each_bad_expert_is_one_clear_error(trained, tmp_path, monkeypatch, case, error, message):
    no_finetuning(monkeypatch)
    experts = {name: str(path) for name, path in trained["experts"].items()}
    bad = {
        "labels": lambda: trained["experts"]["t1"],
        "architecture": lambda: tiny_classifier("roberta", tmp_path / "roberta", num_labels=2),
        "shapes": lambda: bert_classifier(tmp_path / "wide", 2, intermediate_size=40),
        "tensors": lambda: bert_classifier(tmp_path / "shallow", 2, num_hidden_layers=1),
        "copy": lambda: base_copy(trained, tmp_path / "copy"),
        "missing": lambda: "./no/such/expert",
        "adapter": lambda: headless_adapter(trained["base"], tmp_path / "lora"),
        "feature": lambda: bert_classifier(tmp_path / "native", 2),  # a sound expert, but read by its pooler
    }[case]()
    cfg = experts_config(trained, {**experts, "t0": str(bad)})
    with pytest.raises(error, match=message) as info:
        load_expert_pool(cfg, tmp_path / "cache")
    assert "\n" not in str(info.value)


def headless_adapter(base: Path, folder: Path) -> Path:
    """A PEFT LoRA adapter of the base's encoder that saves no classification head (no SEQ_CLS task type)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])).save_pretrained(folder)
    return folder


def test_a_hub_id_that_cannot_be_downloaded_says_what_to_do(trained, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    asked = []

    def offline(repo_id, **kwargs):  # noqa: ANN001, ANN003, ANN202
        asked.append(repo_id)
        raise LocalEntryNotFoundError("outgoing traffic has been disabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    experts = {name: str(path) for name, path in trained["experts"].items()}
    cfg = experts_config(trained, {**experts, "t1": "my-org/bert-t1"})
    with pytest.raises(CheckpointError) as info:
        load_expert_pool(cfg, tmp_path / "cache")
    assert asked == ["my-org/bert-t1"]
    assert str(info.value) == (
        "expert 't1' 'my-org/bert-t1' is no local path and cannot be downloaded from the Hugging Face Hub (offline? "
        "LocalEntryNotFoundError); download it elsewhere with `huggingface-cli download my-org/bert-t1 --local-dir DIR`"
        " and give the folder"
    )
    with pytest.raises(CheckpointError, match="base 'org/base-model' is no local path.*huggingface-cli download"):
        load_expert_pool(ExperimentConfig.model_validate({**trained["config"], "base": "org/base-model"}), tmp_path)


def test_a_hub_id_is_downloaded_and_used_like_a_folder(trained, tmp_path, monkeypatch):
    import huggingface_hub

    copies = copied_experts(trained, tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: copies[repo_id.split("/")[1]])
    no_finetuning(monkeypatch)
    pool = load_expert_pool(experts_config(trained, {name: f"org/{name}" for name in TASKS}), tmp_path / "cache")
    assert {name: str(e.path) for name, e in pool.experts.items()} == copies
    fingerprints = {name: e.fingerprint for name, e in pool.experts.items()}
    again = load_expert_pool(experts_config(trained, {n: str(p) for n, p in trained["experts"].items()}), tmp_path)
    assert fingerprints == {name: e.fingerprint for name, e in again.experts.items()}  # content, not place


def test_hub_ids_and_local_paths_are_told_apart():
    assert looks_like_hub_id("org/name") and looks_like_hub_id("bert-base-uncased") and looks_like_hub_id("a/b.c-d_e")
    for path in ("./org/name", "/abs/path", "a/b/c", "~/model", "../model", "org/", "dir\\name"):
        assert not looks_like_hub_id(path), path


def test_experts_must_cover_exactly_the_tasks(trained, tmp_path):
    experts = {name: str(path) for name, path in trained["experts"].items()}
    path = tmp_path / "c.yaml"
    for given, message in (({"t0": experts["t0"], "t1": experts["t1"]}, r"missing: \['t2'\], not a task: \[\]"),
                           ({**experts, "t9": experts["t0"]}, r"missing: \[\], not a task: \['t9'\]")):  # fmt: skip
        path.write_text(yaml.safe_dump({**trained["config"], "experts": given}))
        with pytest.raises(ConfigError, match="experts must give exactly one expert per task.*" + message):
            load_experiment_config(path)


def test_new_keys_stay_out_of_the_stored_config_unless_given(trained):
    for name in ("demo", "full"):
        dump = builtin_config(name).model_dump(mode="json")
        assert "experts" not in dump  # the stored config, hence an existing run folder, is unchanged
        assert all(set(task) == {"name", "path", "text_column", "label_column"} for task in dump["tasks"])
    cfg = experts_config(trained, {name: f"org/{name}" for name in TASKS})
    assert cfg.model_dump(mode="json")["experts"] == {name: f"org/{name}" for name in TASKS}
    task = {"name": "sst2", "source": "glue", "subset": "sst2", "text_column": "sentence",
            "splits": {"validation": "validation", "test": "validation"}}  # fmt: skip
    dumped = ExperimentConfig.model_validate({"tasks": [task]}).model_dump(mode="json")["tasks"][0]
    assert dumped == {**task, "path": None, "label_column": "label"}
    with pytest.raises(ValueError, match="gives both path and source"):
        ExperimentConfig.model_validate({"tasks": [{**task, "path": "/data"}]})
    with pytest.raises(ValueError, match="splits"):
        ExperimentConfig.model_validate({"tasks": [{"name": "x", "source": "glue", "splits": {"dev": "x"}}]})


def test_a_bench_task_from_a_hub_dataset_with_its_column_and_split_mapping(tmp_path, monkeypatch):
    import datasets
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"sentence": Value("string"), "sentiment": ClassLabel(names=["bad", "good"])})
    hub = DatasetDict({split: Dataset.from_dict({"sentence": ["a", "b", "c"], "sentiment": [0, 1, 1]}, features=features)
                       for split in ("train", "dev", "heldout")})  # fmt: skip
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda source, subset: asked.append((source, subset)) or hub)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"tasks": [{"name": "reviews", "source": "org/reviews", "subset": "en",
                                               "text_column": "sentence", "label_column": "sentiment",
                                               "splits": {"validation": "dev", "test": "heldout"}}]}))  # fmt: skip
    task = pool_module.load_tasks(load_experiment_config(path))["reviews"]
    assert asked == [("org/reviews", "en")] and task.label_names == ["bad", "good"]
    assert {s: v.labels for s, v in task.splits.items()} == {"train": [0, 1, 1], "validation": [0, 1, 1], "test": [0, 1, 1]}
