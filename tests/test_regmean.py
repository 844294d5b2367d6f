"""RegMean: closed form per Linear layer, Grams from hooks, and an end-to-end merge of tiny HF classifiers."""

from __future__ import annotations

import torch
from torch import nn

from mergelab.learned.regmean import linear_input_grams, regmean, regmean_merge, regmean_solve, shrink
from mergelab.models.hf import load_encoder
from tests._text_helpers import make_task, tiny_classifier


def test_single_linear_layer_equals_least_squares():
    torch.manual_seed(0)
    xs = [torch.randn(50, 6), torch.randn(50, 6) * 2 + 1]
    ws = [torch.randn(4, 6), torch.randn(4, 6)]
    grams = [x.T @ x / len(x) for x in xs]
    merged = regmean_solve(grams, ws, alpha=1.0)
    # the test's own closed form: min_W Σ_t ||X_t Wᵀ − X_t W_tᵀ||² (equal n per model)
    stacked_x = torch.cat(xs).double()
    targets = torch.cat([x @ w.T for x, w in zip(xs, ws, strict=True)]).double()
    expected = torch.linalg.lstsq(stacked_x, targets).solution.T
    torch.testing.assert_close(merged.double(), expected, atol=1e-5, rtol=1e-5)


def test_one_model_returns_that_model():
    torch.manual_seed(1)
    w = torch.randn(3, 5)
    x = torch.randn(20, 5)
    for alpha in (1.0, 0.5, 0.0):
        torch.testing.assert_close(regmean_solve([x.T @ x], [w], alpha), w, atol=1e-5, rtol=1e-5)
    state = {"lin.weight": w, "ln.weight": torch.ones(5), "ids": torch.arange(3)}
    merged = regmean_merge(state, [state], [{"lin.weight": x.T @ x}], alpha=0.9)
    torch.testing.assert_close(merged["lin.weight"], w, atol=1e-5, rtol=1e-5)
    assert torch.equal(merged["ln.weight"], state["ln.weight"]) and torch.equal(merged["ids"], state["ids"])


def test_shrinkage_and_singular_fallback():
    gram = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    assert torch.equal(shrink(gram, 0.0), torch.diag(torch.tensor([2.0, 3.0])))
    assert torch.equal(shrink(gram, 1.0), gram)
    singular = torch.zeros(2, 2)
    singular[0, 0] = 1.0
    out = regmean_solve([singular], [torch.ones(1, 2)], alpha=1.0)  # rank-deficient: ridge, no crash
    assert torch.isfinite(out).all()


def test_grams_from_hooks_skip_padding():
    layer = nn.Sequential(nn.Linear(3, 2))

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = layer

        def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    grams = linear_input_grams(Wrapper(), [{"x": x, "attention_mask": mask}])
    kept = x[mask.bool()]
    torch.testing.assert_close(grams["inner.0.weight"], kept.T @ kept / len(kept))


def test_regmean_merges_tiny_hf_classifiers(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    base_cls = tiny_classifier("bert", tmp_path / "cls", seed=0)
    base = tmp_path / "base"
    AutoModel.from_pretrained(base_cls).save_pretrained(base)
    AutoTokenizer.from_pretrained(base_cls).save_pretrained(base)
    experts = [tiny_classifier("bert", tmp_path / f"e{i}", seed=i + 1) for i in range(2)]
    texts = [make_task(f"t{i}", seed=i).splits["train"].texts for i in range(2)]
    state = regmean(str(base), [str(e) for e in experts], texts, alpha=0.95, num_examples=16, batch_size=8)
    encoder = load_encoder(state, base)
    assert encoder.encode_texts(texts[0][:3]).shape == (3, 32)
    query = "encoder.layer.0.attention.self.query.weight"
    single = regmean(str(base), [str(experts[0])], texts[:1], num_examples=16, batch_size=8)
    first = load_encoder(experts[0], experts[0]).model.state_dict()
    torch.testing.assert_close(single[query], first[query], atol=1e-4, rtol=1e-4)  # RegMean of one model = it


def test_regmean_from_the_cli(tmp_path):
    import pandas as pd
    from transformers import AutoModel, AutoTokenizer
    from typer.testing import CliRunner

    from mergelab.cli import app

    cls = tiny_classifier("bert", tmp_path / "cls", seed=0)
    base = tmp_path / "base"
    AutoModel.from_pretrained(cls).save_pretrained(base)
    AutoTokenizer.from_pretrained(cls).save_pretrained(base)
    args = ["merge", "--method", "regmean", "--base", str(base), "--out", str(tmp_path / "out"),
            "--param", "num_examples=8"]  # fmt: skip
    for i in range(2):
        expert = tiny_classifier("bert", tmp_path / f"e{i}", seed=i + 1)
        task = make_task(f"t{i}", seed=i)
        folder = tmp_path / f"d{i}"
        folder.mkdir()
        for split, part in task.splits.items():
            pd.DataFrame({"text": part.texts, "label": part.labels}).to_csv(folder / f"{split}.csv", index=False)
        args += ["--model", str(expert), "--data", str(folder)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert load_encoder(tmp_path / "out", base).encode_texts(["alpha beta"]).shape == (1, 32)
    missing = CliRunner().invoke(app, args[:-2] + ["--force"])  # one --data short
    assert missing.exit_code != 0 and "one data entry per model (2 models, 1 data)" in missing.output
