"""End-to-end merges through the streaming engine on real (tiny) HF checkpoints, against naive references."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

import mergelab
from mergelab.core.errors import CheckpointError, ConfigError
from mergelab.io.reader import open_checkpoint
from tests.conftest import make_family


def _encoder_state(path, prefix="bert."):
    state = load_file(str(path / "model.safetensors"))
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _naive(method, base, models, **params):
    """Whole-model, in-memory references written independently of mergelab's maths."""
    names = [k for k, v in base.items() if v.is_floating_point()]
    taus = {k: torch.stack([m[k] - base[k] for m in models]) for k in names}
    out = dict(base)
    if method == "task_arithmetic":
        for k in names:
            out[k] = base[k] + params["scale"] * taus[k].sum(0)
    elif method == "weight_average":
        for k in names:
            out[k] = torch.stack([m[k] for m in models]).mean(0)
    elif method == "magmax":
        for k in names:
            t = taus[k]
            flipped = t.flip(0)  # later model wins ties: argmax returns the first max of the flipped stack
            idx = len(models) - 1 - flipped.abs().argmax(0)
            out[k] = base[k] + params["scale"] * t.gather(0, idx.unsqueeze(0)).squeeze(0)
    elif method == "ties":
        flat = torch.cat([taus[k].reshape(len(models), -1) for k in names], dim=1)
        P = flat.shape[1]
        k_small = P - int(params["density"] * P)
        thr = flat.abs().kthvalue(k_small, dim=1, keepdim=True).values
        trimmed = flat * (flat.abs() >= thr)
        sign = trimmed.sum(0).sign()
        sign[sign == 0] = sign.sum().sign()
        keep = ((trimmed > 0) & (sign > 0)) | ((trimmed < 0) & (sign < 0))
        merged = (trimmed * keep).sum(0)
        offset = 0
        for k in names:
            n = base[k].numel()
            out[k] = base[k] + params["scale"] * merged[offset:offset + n].reshape(base[k].shape)
            offset += n
    return out


@pytest.mark.parametrize(
    "method,params",
    [
        ("task_arithmetic", {"scale": 0.3}),
        ("weight_average", {}),
        ("magmax", {"scale": 0.5}),
        ("ties", {"density": 0.2, "scope": "global", "disjoint": "sum", "scale": 0.3}),
    ],
)
def test_streaming_merge_equals_naive_reference(family, method, params):
    base_dir, model_dirs = family
    base = load_file(str(base_dir / "model.safetensors"))
    models = [_encoder_state(p) for p in model_dirs]
    expected = _naive(method, base, models, **params)
    result = mergelab.merge(method, base_dir, model_dirs, **params)
    assert result.path is None and result.method == method and not result.transductive and result.info == {}
    merged = result.state
    assert sorted(merged) == sorted(base)  # base layout, no heads
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_every_registered_method_merges_the_bare_vs_prefixed_layouts(family, tmp_path):
    base_dir, model_dirs = family
    base = load_file(str(base_dir / "model.safetensors"))
    weight_space = [spec.name for spec in mergelab.list_methods() if not spec.reads_data]
    assert len(weight_space) == 8
    for name in weight_space:
        out = mergelab.merge(name, base_dir, model_dirs, out=tmp_path / name).path
        assert out == tmp_path / name
        model = AutoModel.from_pretrained(out)  # loads in the base's layout
        state = model.state_dict()
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        merged = open_checkpoint(out)
        assert set(merged.keys()) == set(base)
        assert torch.equal(merged.get("embeddings.position_ids"), base["embeddings.position_ids"])  # int buffer
        assert torch.equal(state["embeddings.word_embeddings.weight"], merged.get("embeddings.word_embeddings.weight"))


def test_task_arithmetic_scale_zero_is_the_base(family):
    base_dir, model_dirs = family
    merged = mergelab.merge("task_arithmetic", base_dir, model_dirs, scale=0.0).state
    for name, tensor in load_file(str(base_dir / "model.safetensors")).items():
        assert torch.equal(merged[name], tensor)


def test_heads_are_never_merged(tmp_path):
    """With a base saved *with* a head, the head is copied from the base, never averaged."""
    base_dir, model_dirs = make_family(tmp_path, num_models=2)
    merged = mergelab.merge("task_arithmetic", model_dirs[0], model_dirs[1:], scale=1.0).state
    ft0 = load_file(str(model_dirs[0] / "model.safetensors"))
    assert torch.equal(merged["classifier.weight"], ft0["classifier.weight"])


def test_bf16_in_bf16_out_and_dtype_override(tmp_path):
    base_dir, model_dirs = make_family(tmp_path, num_models=2, dtype=torch.bfloat16)
    merged = mergelab.merge("task_arithmetic", base_dir, model_dirs, scale=0.5).state
    assert merged["embeddings.word_embeddings.weight"].dtype == torch.bfloat16
    merged32 = mergelab.merge("task_arithmetic", base_dir, model_dirs, scale=0.5, dtype="fp32").state
    assert merged32["embeddings.word_embeddings.weight"].dtype == torch.float32
    assert merged32["embeddings.position_ids"].dtype == torch.int64


def test_nan_input_is_an_error_unless_allowed(family, tmp_path):
    base_dir, model_dirs = family
    state = load_file(str(model_dirs[1] / "model.safetensors"))
    state["bert.encoder.layer.0.attention.self.query.weight"][0, 0] = float("nan")
    bad = {k: v for k, v in state.items()}
    with pytest.raises(CheckpointError, match="NaN/Inf.*query.weight|query.weight.*NaN/Inf"):
        mergelab.merge("task_arithmetic", base_dir, [model_dirs[0], bad], out=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    merged = mergelab.merge("weight_average", base_dir, [model_dirs[0], bad], allow_nonfinite=True).state
    assert torch.isnan(merged["encoder.layer.0.attention.self.query.weight"][0, 0])


def test_shape_mismatch_and_missing_tensor_name_tensor_and_files(family, tmp_path):
    base_dir, model_dirs = family
    state = load_file(str(model_dirs[1] / "model.safetensors"))
    wrong = dict(state)
    wrong["bert.pooler.dense.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"pooler\.dense\.weight.*shape"):
        mergelab.merge("task_arithmetic", base_dir, [model_dirs[0], wrong])
    missing = {k: v for k, v in state.items() if "pooler.dense.weight" not in k}
    with pytest.raises(CheckpointError, match=r"pooler\.dense\.weight.*missing"):
        mergelab.merge("task_arithmetic", base_dir, [model_dirs[0], missing])
    # the user can exclude it explicitly
    merged = mergelab.merge("task_arithmetic", base_dir, [model_dirs[0], missing], exclude=[r"pooler\."]).state
    assert torch.equal(merged["pooler.dense.weight"], load_file(str(base_dir / "model.safetensors"))["pooler.dense.weight"])


def test_unknown_method_and_bad_params(family):
    base_dir, model_dirs = family
    with pytest.raises(ConfigError, match="unknown merge method 'tiez'.*ties"):
        mergelab.merge("tiez", base_dir, model_dirs)
    with pytest.raises(ConfigError, match="densty"):
        mergelab.merge("ties", base_dir, model_dirs, densty=0.2)
    with pytest.raises(ConfigError, match="density"):
        mergelab.merge("ties", base_dir, model_dirs, density=1.5)
    with pytest.raises(ConfigError, match="scope"):
        mergelab.merge("ties", base_dir, model_dirs, scope="layer")


def test_include_pattern_limits_merged_tensors(family):
    base_dir, model_dirs = family
    merged = mergelab.merge("task_arithmetic", base_dir, model_dirs, scale=1.0, include=[r"attention\.self\.query\.weight"]).state
    base = load_file(str(base_dir / "model.safetensors"))
    assert torch.equal(merged["encoder.layer.0.output.dense.weight"], base["encoder.layer.0.output.dense.weight"])
    assert not torch.equal(merged["encoder.layer.0.attention.self.query.weight"], base["encoder.layer.0.attention.self.query.weight"])


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_in_memory_inputs_are_never_modified(scope):
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=gen), "b": torch.randn(5, generator=gen)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    saved = [{k: v.clone() for k, v in sd.items()} for sd in [base, *models]]
    merged = mergelab.merge("ties", base, models, density=0.4, scope=scope, scale=1.0).state
    for original, copy in zip([base, *models], saved, strict=True):
        assert all(torch.equal(original[k], copy[k]) for k in copy)
    again = mergelab.merge("ties", saved[0], saved[1:], density=0.4, scope=scope, scale=1.0).state
    assert all(torch.equal(merged[k], again[k]) for k in merged)


# ------------------------------------------------------------------------------------- one entry point, routing


def test_models_may_be_named_by_task_and_a_list_is_named_in_order(family):
    base_dir, model_dirs = family
    by_list = mergelab.merge("task_arithmetic", base_dir, model_dirs, scale=0.3).state
    by_name = mergelab.merge("task_arithmetic", base_dir, {f"t{i}": p for i, p in enumerate(model_dirs)}, scale=0.3)
    assert all(torch.equal(by_list[k], by_name.state[k]) for k in by_list)
    with pytest.raises(ConfigError, match="models must be a list of checkpoints or a mapping"):
        mergelab.merge("task_arithmetic", base_dir, str(model_dirs[0]))
    with pytest.raises(ConfigError, match="put a single checkpoint or state dict in a list"):
        mergelab.merge("task_arithmetic", None, {"w": torch.zeros(2)})


def test_data_is_required_by_data_methods_and_refused_by_weight_methods(family, tmp_path):
    base_dir, model_dirs = family
    with pytest.raises(ConfigError, match=r"^method 'regmean' reads each task's train split: pass data=\{task"):
        mergelab.merge("regmean", base_dir, model_dirs)
    with pytest.raises(ConfigError, match=r"^method 'ties' merges weights only; data= is only for data-dependent "
                                          r"methods \(fisher, fisher_batch, regmean, adamerging, tall_consensus"):
        mergelab.merge("ties", base_dir, model_dirs, data=[tmp_path] * 3)
    with pytest.raises(ConfigError, match=r"option\(s\) max_length, memo do not apply to method 'ties': it merges "
                                          "weights only"):
        mergelab.merge("ties", base_dir, model_dirs, max_length=32, memo={})
    with pytest.raises(ConfigError, match=r"option\(s\) exclude, dtype do not apply to method 'regmean': it reads "
                                          "task data"):
        mergelab.merge("regmean", base_dir, model_dirs, data=[tmp_path] * 3, exclude=(), dtype="bf16")
    with pytest.raises(ConfigError, match=r"one data entry per model \(3 models, 2 data\)"):
        mergelab.merge("regmean", base_dir, model_dirs, data=[tmp_path] * 2)
    state = load_file(str(base_dir / "model.safetensors"))
    with pytest.raises(ConfigError, match="give the base and every model as a Hugging Face folder"):
        mergelab.merge("regmean", state, model_dirs, data=[tmp_path] * 3)


def test_seed_and_batch_size_are_parameters_of_the_methods_that_declare_them(family):
    base_dir, model_dirs = family
    seeded = mergelab.merge("dare", base_dir, model_dirs, seed=7).state
    other = mergelab.merge("dare", base_dir, model_dirs, seed=8).state
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(seeded[name], other[name])  # DARE's own seed, not a data-sampling option
    assert torch.equal(seeded[name], mergelab.merge("dare", base_dir, model_dirs, seed=7).state[name])
    with pytest.raises(ConfigError, match=r"option\(s\) seed do not apply to method 'ties': it merges weights only"):
        mergelab.merge("ties", base_dir, model_dirs, seed=1)


@pytest.mark.parametrize(
    "name,message",
    [
        ("neulig", r"'neulig' does not produce one merged model \(router\); run it with `mergelab neulig`"),
        ("pleas", r"'pleas' does not produce one merged model \(wider model\); run it with `mergelab bench pleas`"),
        ("tall_masks", r"'tall_masks' does not produce one merged model \(per task models\); run it with "
                       r"mergelab\.learned\.api\.tall_masks_with_data"),
    ],
)
def test_entries_that_are_not_one_merged_model_name_their_runner(family, name, message):
    base_dir, model_dirs = family
    assert mergelab.get_method_spec(name).produces != "merged_model"
    with pytest.raises(ConfigError, match=message):
        mergelab.merge(name, base_dir, model_dirs)
