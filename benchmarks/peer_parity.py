"""Numerical parity of mergelab's merges with the peers' own code: mergekit 0.1.5 and FusionBench 0.2.33.

Installs the peers into a throwaway virtual environment (``benchmarks/.peer-venv`` by default; ``torch==2.13.0``
first, the CPU wheel, so that no peer pulls a CUDA build), builds a tiny random BERT (``BertModel``, base + 3
fine-tunes made by adding seeded noise with a shared direction, saved as HF folders), merges it with
``mergelab.merge`` here and with the peers there (mergekit through its ``mergekit-pytorch`` CLI, which merges
every tensor of the safetensors files with the registered merge methods; ``mergekit-yaml`` 0.1.5 stops on BERT
with "TypeError: can only concatenate list (not "tuple") to list" in ``plan.py`` ``plan_tensor``; FusionBench
through its algorithm classes driven by a small script run by the peer venv's python), and prints max |Δ| per
method over every merged weight.

Some LayerNorm and pooler tensors sit on a 2^-10 grid, so their task vectors have exact magnitude ties and exact
sign cancellations: per-tensor TIES then has to break ties at the cut the way mergekit does, and both TIES scopes
have to resolve zero sign sums the way their peer does.

DARE is compared with FusionBench only, on fixed masks: the peer's ``torch.rand_like`` is replaced by the uniform
draws mergelab's masks come from (``ops.dare_seed`` per model and tensor). FusionBench keeps u > p where mergelab
keeps u ≥ p, so the masks are equal unless a draw is exactly p (counted and printed). mergekit's ``dare_*`` are
not compared: their masks come from the global RNG with no tensor identity, and their ``rescale`` matches the
L1 norm of the tensor instead of dividing by 1 − p.

Exit status 1 if task arithmetic or either TIES scope differs by more than 1e-6 (or is missing), 2 if a peer
cannot be installed or run.

Usage: python benchmarks/peer_parity.py [--peer-venv DIR] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import venv
from dataclasses import dataclass, field
from pathlib import Path

import torch

TORCH_SPEC = "torch==2.13.0"
PEERS = ("mergekit==0.1.5", "fusion-bench==0.2.33")
TOLERANCE = 1e-6
NUM_MODELS = 3
GRID = 2.0**-10
TIED = re.compile(r"LayerNorm|pooler")  # tensors whose base and task vectors sit on the grid (exact ties)
DEFAULT_VENV = Path(__file__).resolve().parent / ".peer-venv"
WEIGHTS = "model.safetensors"

# Run by the peer venv's python: FusionBench's algorithm classes on fresh models, results saved as safetensors.
_FUSIONBENCH_DRIVER = textwrap.dedent(
    """
    import importlib.metadata as md, json, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from transformers import BertModel
    import fusion_bench.method as fbm
    from fusion_bench.modelpool import BaseModelPool

    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(job["out"])
    report = {"versions": {p: md.version(p) for p in ("fusion-bench", "mergekit", "torch", "transformers")}}

    def pool():
        models = {"_pretrained_": BertModel.from_pretrained(job["base"]).float()}
        for index, path in enumerate(job["models"]):
            models[f"model_{index}"] = BertModel.from_pretrained(path).float()
        return BaseModelPool(models)

    def fixed_draws(p):
        # the uniforms of mergelab's DARE masks, in FusionBench's drop order (model by model, parameter order)
        names = [n for n, _ in BertModel.from_pretrained(job["base"]).named_parameters()]
        queue, exact = [], 0
        for index in range(len(job["models"])):
            for name in names:
                u = torch.rand(tuple(job["shapes"][name]),
                               generator=torch.Generator().manual_seed(job["dare_seeds"][str(index)][name]))
                exact += int((u == p).sum())
                queue.append(u)
        return queue, exact

    for run in job["runs"]:
        original = torch.rand_like
        if run.get("fixed_dare_masks"):
            queue, exact = fixed_draws(run["kwargs"]["sparsity_ratio"])
            report[run["name"] + ":u_equal_p"] = exact

            def rand_like(tensor, *args, **kwargs):
                u = queue.pop(0)
                assert u.shape == tensor.shape, (u.shape, tensor.shape)
                return u.to(tensor.dtype)

            torch.rand_like = rand_like
        try:
            merged = getattr(fbm, run["algorithm"])(**run["kwargs"]).run(pool())
        finally:
            torch.rand_like = original
        if run.get("fixed_dare_masks"):
            assert not queue, f"{len(queue)} fixed draws unused"
        state = {k: v.detach().float().contiguous().clone() for k, v in merged.state_dict().items()}
        save_file(state, str(out / (run["name"] + ".safetensors")))
    (out / "report.json").write_text(json.dumps(report))
    """
)


@dataclass
class Row:
    """One comparison: a mergelab merge against one peer's merge of the same checkpoints."""

    label: str
    method: str
    params: dict
    peer: str  # "mergekit" or "fusionbench"
    peer_label: str
    peer_config: dict
    gated: bool
    note: str = ""
    result: dict = field(default_factory=dict)

    @property
    def peer_text(self) -> str:
        return f"{'mergekit' if self.peer == 'mergekit' else 'FusionBench'} {self.peer_label}"


def rows() -> list[Row]:
    w = [1.0] * NUM_MODELS
    per_model = [0.5, 0.7, 1.2]
    mk = "mergekit"
    fb = "fusionbench"
    return [
        Row("task arithmetic λ=1", "task_arithmetic", {"scale": 1.0}, mk, "task_arithmetic, weight 1",
            {"merge_method": "task_arithmetic", "weights": w}, True),
        Row("task arithmetic λ=0.3", "task_arithmetic", {"scale": 0.3}, mk, "task_arithmetic, weight 0.3",
            {"merge_method": "task_arithmetic", "weights": [0.3] * NUM_MODELS}, True),
        Row("TIES per_tensor d=0.3 λ=1 sum", "ties", {"scope": "per_tensor", "tie_break": "argsort", "density": 0.3, "scale": 1.0}, mk,
            "ties, density 0.3, weight 1, normalize false",
            {"merge_method": "ties", "weights": w, "density": 0.3, "normalize": False}, True),
        Row("TIES per_tensor d=0.3 λ=[.5,.7,1.2] sum", "ties",
            {"scope": "per_tensor", "tie_break": "argsort", "density": 0.3, "scale": per_model}, mk,
            "ties, density 0.3, weights .5/.7/1.2, normalize false",
            {"merge_method": "ties", "weights": per_model, "density": 0.3, "normalize": False}, True),
        Row("TIES per_tensor d=0.3 λ=1 mean", "ties",
            {"scope": "per_tensor", "tie_break": "argsort", "density": 0.3, "scale": 1.0, "disjoint": "mean"}, mk,
            "ties, density 0.3, weight 1, normalize true",
            {"merge_method": "ties", "weights": w, "density": 0.3, "normalize": True}, True),
        Row("model stock", "model_stock", {}, mk, "model_stock", {"merge_method": "model_stock"}, False,
            "mergelab: cosine in float64, clamped to [0, 1]"),
        Row("weight average", "weight_average", {}, mk, "linear, weight 1, normalize true",
            {"merge_method": "linear", "weights": w, "normalize": True}, False),
        Row("task arithmetic λ=1", "task_arithmetic", {"scale": 1.0}, fb, "TaskArithmeticAlgorithm(1.0)",
            {"algorithm": "TaskArithmeticAlgorithm", "kwargs": {"scaling_factor": 1.0}}, True),
        Row("task arithmetic λ=0.3", "task_arithmetic", {"scale": 0.3}, fb, "TaskArithmeticAlgorithm(0.3)",
            {"algorithm": "TaskArithmeticAlgorithm", "kwargs": {"scaling_factor": 0.3}}, True),
        Row("TIES global d=0.3 λ=1 sum", "ties", {"scope": "global", "density": 0.3, "scale": 1.0}, fb,
            "TiesMergingAlgorithm(threshold 30, 1.0, sum)",
            {"algorithm": "TiesMergingAlgorithm",
             "kwargs": {"scaling_factor": 1.0, "threshold": 30, "remove_keys": [], "merge_func": "sum"}}, True),
        Row("TIES global d=0.2 λ=0.3 sum", "ties", {"scope": "global", "density": 0.2, "scale": 0.3}, fb,
            "TiesMergingAlgorithm(threshold 20, 0.3, sum)",
            {"algorithm": "TiesMergingAlgorithm",
             "kwargs": {"scaling_factor": 0.3, "threshold": 20, "remove_keys": [], "merge_func": "sum"}}, True),
        Row("TIES global d=0.3 λ=1 mean", "ties",
            {"scope": "global", "density": 0.3, "scale": 1.0, "disjoint": "mean"}, fb,
            "TiesMergingAlgorithm(threshold 30, 1.0, mean)",
            {"algorithm": "TiesMergingAlgorithm",
             "kwargs": {"scaling_factor": 1.0, "threshold": 30, "remove_keys": [], "merge_func": "mean"}}, True),
        Row("DARE p=0.5 + TA λ=0.3", "dare", {"seed": 0}, fb, "DareTaskArithmetic(0.3, p 0.5), fixed masks",
            {"algorithm": "DareTaskArithmetic", "fixed_dare_masks": True,
             "kwargs": {"scaling_factor": 0.3, "sparsity_ratio": 0.5, "only_on_linear_weights": False,
                        "rescale": True}}, False),
        Row("DARE p=0.5 + TIES global λ=0.5", "dare", {"seed": 0, "then": "ties"}, fb,
            "DareTiesMerging(0.5, p 0.5, threshold 20, sum), fixed masks",
            {"algorithm": "DareTiesMerging", "fixed_dare_masks": True,
             "kwargs": {"sparsity_ratio": 0.5, "only_on_linear_weights": False, "rescale": True,
                        "scaling_factor": 0.5, "threshold": 20, "remove_keys": [], "merge_func": "sum"}}, False),
        Row("MagMax λ=0.5", "magmax", {"scale": 0.5}, fb, "MagMaxAlgorithm(0.5)",
            {"algorithm": "MagMaxAlgorithm", "kwargs": {"scaling_factor": 0.5}}, False),
        Row("model stock", "model_stock", {}, fb, "ModelStock()", {"algorithm": "ModelStock", "kwargs": {}}, False,
            "different rule: FusionBench averages pairwise angles, mergelab and mergekit cosines"),
        Row("weight average", "weight_average", {}, fb, "SimpleAverageAlgorithm()",
            {"algorithm": "SimpleAverageAlgorithm", "kwargs": {}}, False),
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------ peer venv


class PeerError(RuntimeError):
    """A peer could not be installed or run."""


def _pip(python: Path, *args: str) -> None:
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "is ignored: it is neither" not in line]
        raise PeerError(f"pip install {' '.join(args)} failed:\n" + "\n".join(lines[-25:]))


def _peer_python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def ensure_peer_venv(venv_dir: Path) -> tuple[Path, dict[str, str]]:
    """The peer venv's python, created and filled on first use (torch first, then each pinned peer), and the
    install error of each peer that could not be installed (an empty dict when all are there)."""
    marker = venv_dir / ".parity-installed"
    wanted = " ".join((TORCH_SPEC, *PEERS))
    python = _peer_python(venv_dir)
    if marker.exists() and marker.read_text().strip() == wanted and python.exists():
        return python, {}
    print(f"installing {wanted} into {venv_dir} (first run: a few minutes)", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(venv_dir)
    _pip(python, TORCH_SPEC)
    torch_version = _version(python, "torch")
    errors = {}
    for spec in PEERS:
        try:
            _pip(python, spec)
        except PeerError as exc:
            errors[spec.split("==")[0]] = str(exc)
        if _version(python, "torch") != torch_version:
            raise PeerError(f"installing {spec} replaced torch {torch_version} by {_version(python, 'torch')}")
    if not errors:
        marker.write_text(wanted + "\n")
    return python, errors


def _version(python: Path, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()


# ------------------------------------------------------------------------------------------------ checkpoints


def build_family(root: Path) -> tuple[Path, list[Path], dict[str, tuple[int, ...]]]:
    """Tiny random BERT base + fine-tunes θ_t = θ₀ + 0.01·(0.6·shared + noise_t), as HF folders."""
    from transformers import BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, type_vocab_size=2)  # fmt: skip
    torch.manual_seed(0)
    model = BertModel(config).eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name in base:
        if TIED.search(name):
            base[name] = torch.round(base[name] / GRID) * GRID
    generator = torch.Generator().manual_seed(1)
    shared = {k: torch.randn(v.shape, generator=generator) for k, v in base.items()}
    paths = []
    for index in range(NUM_MODELS + 1):
        state = {}
        for name, value in base.items():
            if index == 0:
                state[name] = value
                continue
            delta = 0.01 * (0.6 * shared[name] + torch.randn(value.shape, generator=generator))
            if TIED.search(name):
                delta = torch.round(delta / GRID) * GRID  # exact: base and delta on the grid
            state[name] = value + delta
        model.load_state_dict(state)
        path = root / ("base" if index == 0 else f"ft{index}")
        model.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1:], {k: tuple(v.shape) for k, v in base.items()}


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


# ------------------------------------------------------------------------------------------------ merges


def run_mergekit(python: Path, row: Row, base: Path, models: list[Path], work: Path) -> dict[str, torch.Tensor]:
    cfg = row.peer_config
    model_params = [{"weight": w} for w in cfg.get("weights", [None] * len(models))]
    for params in model_params:
        if params["weight"] is None:
            del params["weight"]
        if "density" in cfg:
            params["density"] = cfg["density"]
    config = {
        "merge_method": cfg["merge_method"], "base_model": str(base / WEIGHTS), "dtype": "float32",
        "parameters": {"normalize": cfg["normalize"]} if "normalize" in cfg else {},
        "models": [{"model": str(m / WEIGHTS), "parameters": p} if p else {"model": str(m / WEIGHTS)}
                   for m, p in zip(models, model_params, strict=True)],
    }  # fmt: skip
    if cfg["merge_method"] == "linear":
        del config["base_model"]
    slug = re.sub(r"[^a-z0-9]+", "-", f"{row.label}".lower()).strip("-")
    config_path = work / f"mergekit-{slug}.yaml"
    config_path.write_text(json.dumps(config, indent=1))
    out = work / f"mergekit-{slug}"
    exe = python.with_name("mergekit-pytorch")
    cmd = [str(exe), str(config_path), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise PeerError(f"mergekit-pytorch failed on {row.label}:\n{proc.stderr[-3000:]}")
    return load_folder(out)


def run_fusionbench(python: Path, todo: list[Row], base: Path, models: list[Path], shapes: dict, work: Path):
    from mergelab.merging.ops import dare_seed

    out = work / "fusionbench"
    out.mkdir()
    runs = [{"name": f"run{i}", **row.peer_config} for i, row in enumerate(todo)]
    seeds = {str(t): {n: dare_seed(0, t, n) for n in shapes} for t in range(len(models))}
    job = {"base": str(base), "models": [str(m) for m in models], "out": str(out), "runs": runs,
           "shapes": shapes, "dare_seeds": seeds}  # fmt: skip
    (work / "fusionbench-job.json").write_text(json.dumps(job))
    (work / "fusionbench_driver.py").write_text(_FUSIONBENCH_DRIVER)
    proc = subprocess.run([str(python), str(work / "fusionbench_driver.py"), str(work / "fusionbench-job.json")],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    (work / "fusionbench.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise PeerError(f"the FusionBench driver failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    results = [load_folder_file(out / f"run{i}.safetensors") for i in range(len(todo))]
    return results, report


def load_folder_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict:
    """max |Δ| and the number of differing weights over the tensors mergelab merged (all of them here)."""
    missing = sorted(set(ours) - set(theirs))
    max_diff, differing, total = 0.0, 0, 0
    for name, tensor in ours.items():
        if name in missing:
            continue
        other = theirs[name].to(torch.float32)
        if other.shape != tensor.shape:
            missing.append(name)
            continue
        diff = (tensor.to(torch.float32) - other).abs()
        max_diff = max(max_diff, float(diff.max())) if diff.numel() else max_diff
        differing += int((diff > 0).sum())
        total += diff.numel()
    return {"max_abs_diff": max_diff, "differing": differing, "total": total, "missing": missing}


def straddling_selections(base: Path, models: list[Path], density: float) -> tuple[int, int]:
    """How many (model, tensor) per-tensor selections have ties straddling the cut (the argsort branch)."""
    from mergelab.merging import ops

    theta0 = load_folder(base)
    straddle = total = 0
    for path in models:
        for name, value in load_folder(path).items():
            tau = (value - theta0[name]).reshape(-1)
            count = ops.magnitude_keep_count(tau.numel(), density)
            if 0 < count < tau.numel():
                total += 1
                straddle += ops.top_magnitude_threshold(tau, count) is None
    return straddle, total


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-venv", type=Path, default=DEFAULT_VENV, help="throwaway venv for the peers")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and the peers' outputs")
    args = parser.parse_args()

    import importlib.metadata

    import mergelab

    try:
        python, install_errors = ensure_peer_venv(args.peer_venv.resolve())
    except PeerError as exc:
        print(f"peer install failed: {exc}", file=sys.stderr)
        return 2
    for peer, error in install_errors.items():
        print(f"{peer} could not be installed, its rows are not compared:\n{error}\n", file=sys.stderr)
    skipped = {"mergekit": "mergekit" in install_errors, "fusionbench": "fusion-bench" in install_errors}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mergelab-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base, models, shapes = build_family(work)
        total = sum(torch.Size(s).numel() for s in shapes.values())
        tied = sum(1 for n in shapes if TIED.search(n))
        straddle, selections = straddling_selections(base, models, 0.3)
        todo = [row for row in rows() if not skipped[row.peer]]
        try:
            for row in todo:
                if row.peer == "mergekit":
                    row.result = compare(mergelab.merge(row.method, base, models, **row.params).state,
                                         run_mergekit(python, row, base, models, work))  # fmt: skip
            fb_rows = [row for row in todo if row.peer == "fusionbench"]
            if fb_rows:
                fb_results, report = run_fusionbench(python, fb_rows, base, models, shapes, work)
                for index, (row, theirs) in enumerate(zip(fb_rows, fb_results, strict=True)):
                    row.result = compare(mergelab.merge(row.method, base, models, **row.params).state, theirs)
                    exact = report.get(f"run{index}:u_equal_p")
                    if exact:
                        row.note = f"{exact} draw(s) exactly p: FusionBench drops them, mergelab keeps them"
        except PeerError as exc:
            print(f"peer run failed: {exc}", file=sys.stderr)
            return 2
        versions = [f"{p} {_version(python, p)}" for p in ("mergekit", "fusion-bench", "torch", "transformers")
                    if p not in install_errors]  # fmt: skip
        print(f"peers (in {args.peer_venv}): {', '.join(versions)}")
        print(f"mergelab {importlib.metadata.version('mergelab')}, torch {torch.__version__}")
        print(
            f"checkpoints: tiny BertModel, {len(shapes)} tensors, {total:,} weights, base + {len(models)} "
            f"fine-tunes; {tied} LayerNorm/pooler tensors on a 2^-10 grid (exact |τ| ties and sign cancellations)"
        )
        print(f"per-tensor selections at density 0.3 whose ties straddle the cut (argsort tie-break): "
              f"{straddle} of {selections}\n")  # fmt: skip
        width = max(len(r.peer_text) for r in todo) + 2
        header = f"{'method':<40} {'peer':<{width}} {'max |Δ|':>9} {'differing':>15}  check"
        print(header)
        print("-" * len(header))
        failed = []
        for row in todo:
            r = row.result
            peer = row.peer_text
            differing = f"{r['differing']:,}/{r['total']:,}"
            if row.gated:
                ok = r["max_abs_diff"] <= TOLERANCE and not r["missing"]
                check = "ok (≤ 1e-6)" if ok else "FAIL (> 1e-6)"
                if not ok:
                    failed.append(f"{row.label} vs {row.peer}")
            else:
                check = "info"
            if r["missing"]:
                check += f"; {len(r['missing'])} tensor(s) missing"
            print(f"{row.label:<40} {peer:<{width}} {r['max_abs_diff']:9.2e} {differing:>15}  {check}")
            if row.note:
                print(f"{'':<40}   note: {row.note}")
        print("\nnot compared: DARE vs mergekit (global-RNG masks without tensor identity; its rescale matches the "
              "tensor's L1 norm, not 1/(1 − p)); MagMax vs mergekit (mergekit has no MagMax)")  # fmt: skip
        if failed:
            print(f"\nFAILED (> {TOLERANCE:g}): {', '.join(failed)}", file=sys.stderr)
            return 1
        if any(skipped.values()):
            print("\nnot every peer installed: task arithmetic and TIES not fully checked", file=sys.stderr)
            return 2
        print(f"\ntask arithmetic and both TIES scopes within {TOLERANCE:g} of their peers")
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
