"""Merge speed and peak memory: mergelab vs mergekit vs a bare safetensors loop (the floor).

Builds synthetic LLaMA-shaped sharded checkpoints (base + 3 fine-tunes, ``--size-gb`` each in fp32), then runs
every merge in a fresh subprocess and reports wall time and the subprocess's peak RSS. Printed ratios:

* mergelab / mergekit for task_arithmetic and per-tensor TIES (target: <= 1.0 in time and memory),
* mergelab / floor for task_arithmetic (target: <= 1.3 in time),
* global TIES peak RSS at ``size`` vs ``2 × size`` (target: flat — bounded by the largest tensor, not the model).

Usage: python benchmarks/merge_speed.py [--size-gb 1.0] [--workdir DIR] [--skip-mergekit] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

# Runs a command and reports its own children's peak RSS: a fresh launcher per measurement keeps runs apart.
_LAUNCHER = textwrap.dedent(
    """
    import json, resource, subprocess, sys, time
    start = time.perf_counter()
    code = subprocess.run(sys.argv[1:]).returncode
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"code": code, "wall_s": wall, "peak_rss_mb": rss}))
    """
)

_FLOOR = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    base, models, out = Path(sys.argv[1]), [Path(p) for p in sys.argv[2].split(",")], Path(sys.argv[3])
    out.mkdir(parents=True)
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    by_shard = {}
    for name, shard in index.items():
        by_shard.setdefault(shard, []).append(name)
    for shard, names in by_shard.items():
        result = {}
        with safe_open(str(base / shard), "pt") as b:
            handles = [safe_open(str(m / shard), "pt") for m in models]
            for name in names:
                theta0 = b.get_tensor(name)
                acc = torch.zeros_like(theta0)
                for h in handles:
                    acc += h.get_tensor(name) - theta0
                result[name] = theta0 + 0.3 * acc
            del handles
        save_file(result, str(out / shard))
    """
)


def llama_config(hidden: int, intermediate: int, layers: int, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "torch_dtype": "float32", "tie_word_embeddings": False,
    }  # fmt: skip


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    return shapes


def write_family(root: Path, size_gb: float, num_models: int = 3) -> tuple[Path, list[Path], float]:
    """Base + fine-tunes with ~size_gb of fp32 each, sharded at 500MB; written tensor by tensor."""
    from mergelab.io.writer import ShardedWriter, TensorSpec, atomic_folder

    hidden, intermediate, vocab = 2048, 5632, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate
    fixed = 2 * vocab * hidden
    layers = max(1, math.ceil((size_gb * 1e9 / 4 - fixed) / per_layer))
    cfg = llama_config(hidden, intermediate, layers, vocab)
    shapes = llama_shapes(cfg)
    total_gb = sum(torch.Size(s).numel() for s in shapes.values()) * 4 / 1e9
    specs = [TensorSpec(n, s, torch.float32) for n, s in shapes.items()]
    paths = []
    for index in range(num_models + 1):
        path = root / ("base" if index == 0 else f"ft{index}")
        with atomic_folder(path) as tmp:
            writer = ShardedWriter(tmp, specs, 500 * 10**6)
            for n, (name, shape) in enumerate(shapes.items()):
                gen = torch.Generator().manual_seed(n)
                tensor = torch.randn(shape, generator=gen) * 0.02
                if index:
                    gen_t = torch.Generator().manual_seed(10_000 * index + n)
                    tensor += torch.randn(shape, generator=gen_t) * 0.001
                writer.write(name, tensor)
            writer.close()
            (tmp / "config.json").write_text(json.dumps(cfg))
        paths.append(path)
    return paths[0], paths[1:], total_gb


def measure(cmd: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise RuntimeError(f"command failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return result


def mergelab_cmd(method: str, base: Path, models: list[Path], out: Path, params: dict) -> list[str]:
    entry = [sys.executable, "-c", "from mergelab.cli import main; main()"]  # the `mergelab` command, this Python
    cmd = [*entry, "merge", "--method", method, "--base", str(base), "--out", str(out)]
    for m in models:
        cmd += ["--model", str(m)]
    for k, v in params.items():
        cmd += ["--param", f"{k}={v}"]
    return cmd + ["--max-shard-size", "500MB"]


def mergekit_cmd(method: str, base: Path, models: list[Path], out: Path, workdir: Path) -> list[str]:
    params = {"weight": 0.3} if method == "task_arithmetic" else {"weight": 0.3, "density": 0.2}
    config = {
        "merge_method": method, "base_model": str(base), "dtype": "float32",
        "parameters": {"normalize": False} if method == "ties" else {},
        "models": [{"model": str(m), "parameters": params} for m in models],
    }  # fmt: skip
    cfg_path = workdir / f"mergekit-{method}.yaml"
    cfg_path.write_text(json.dumps(config))
    exe = Path(sys.executable).with_name("mergekit-yaml")
    return [str(exe), str(cfg_path), str(out), "--out-shard-size", "125M", "--no-copy-tokenizer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0, help="fp32 size of each synthetic checkpoint")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mergelab-bench-"))
    rows = []
    try:
        small, large = workdir / "x1", workdir / "x2"
        base, models, gb = write_family(small, args.size_gb)
        print(f"synthetic checkpoints: base + {len(models)} models, {gb:.2f} GB fp32 each, in {small}")

        def run(label: str, cmd: list[str], out: Path) -> dict:
            shutil.rmtree(out, ignore_errors=True)
            result = measure(cmd)
            shutil.rmtree(out, ignore_errors=True)
            rows.append({"run": label, **result})
            print(f"  {label:<34} {result['wall_s']:7.1f} s  {result['peak_rss_mb']:8.0f} MB peak RSS", flush=True)
            return result

        out = workdir / "out"
        floor = run("floor (bare safetensors loop, TA)", [sys.executable, "-c", _FLOOR, str(base),
                                                          ",".join(map(str, models)), str(out)], out)  # fmt: skip
        ta = run("mergelab task_arithmetic", mergelab_cmd("task_arithmetic", base, models, out, {"scale": 0.3}), out)
        tpt = run("mergelab ties per_tensor", mergelab_cmd("ties", base, models, out,
                                                           {"scope": "per_tensor", "density": 0.2}), out)  # fmt: skip
        tg = run("mergelab ties global", mergelab_cmd("ties", base, models, out, {"scope": "global", "density": 0.2}), out)
        mk_ta = mk_ties = None
        if not args.skip_mergekit:
            mk_ta = run("mergekit task_arithmetic", mergekit_cmd("task_arithmetic", base, models, out, workdir), out)
            mk_ties = run("mergekit ties", mergekit_cmd("ties", base, models, out, workdir), out)
        shutil.rmtree(small) if not args.keep else None
        base2, models2, gb2 = write_family(large, 2 * args.size_gb)
        print(f"doubled: {gb2:.2f} GB fp32 each")
        tg2 = run("mergelab ties global (2x size)", mergelab_cmd("ties", base2, models2, out,
                                                                 {"scope": "global", "density": 0.2}), out)  # fmt: skip
        print("\nratios (lower is better):")
        print(f"  task_arithmetic vs floor:   time {ta['wall_s'] / floor['wall_s']:.2f}x   "
              f"memory {ta['peak_rss_mb'] / floor['peak_rss_mb']:.2f}x   (target time <= 1.3x)")  # fmt: skip
        if mk_ta and mk_ties:
            print(f"  task_arithmetic vs mergekit: time {ta['wall_s'] / mk_ta['wall_s']:.2f}x   "
                  f"memory {ta['peak_rss_mb'] / mk_ta['peak_rss_mb']:.2f}x   (target <= 1.0x)")  # fmt: skip
            print(f"  ties per_tensor vs mergekit: time {tpt['wall_s'] / mk_ties['wall_s']:.2f}x   "
                  f"memory {tpt['peak_rss_mb'] / mk_ties['peak_rss_mb']:.2f}x   (target <= 1.0x)")  # fmt: skip
        print(f"  ties global, 2x model size: memory {tg2['peak_rss_mb'] / tg['peak_rss_mb']:.2f}x   "
              f"time {tg2['wall_s'] / tg['wall_s']:.2f}x   (target: memory flat, ~1.0x)")  # fmt: skip
        (Path.cwd() / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
        (Path.cwd() / "benchmarks" / "results" / "merge_speed.json").write_text(json.dumps(rows, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
