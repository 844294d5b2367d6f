"""Merge speed and peak memory: mergelab vs mergekit vs a bare safetensors loop (the floor).

Builds synthetic LLaMA-shaped sharded checkpoints (base + 3 fine-tunes, ``--size-gb`` each in fp32), then runs
every merge in a fresh subprocess (``--repeat`` times: the best wall time and the spread, max - min), reporting wall
time and the subprocess's peak RSS. Both tools write shards of one size (``--shard-mb``: mergelab's
``--max-shard-size`` and mergekit's ``--out-shard-size``). The floor reads every input tensor with safetensors, does
the task-arithmetic sum and writes the output, single-threaded: the I/O plus the least arithmetic. Printed ratios of
the best times:

* every mergelab run / the floor (targets: task_arithmetic <= 1.3, both TIES scopes <= 2.0),
* mergelab / mergekit for task_arithmetic (target: <= 0.8 in time, <= 1.0 in memory) and per-tensor TIES,
* global TIES peak RSS at ``size`` vs ``2 x size`` (target: flat: bounded by the largest tensor, not the model).

mergelab's TIES compiles its fused step with torch.compile in each process (a few seconds, counted in every run);
the first run on a machine whose inductor cache is cold also builds the kernel (tens of seconds): the per-run times
are printed so that it shows.

mergekit-yaml is looked for next to this Python, then in benchmarks/.peer-venv (``make bench`` installs it).

Usage: python benchmarks/merge_speed.py [--size-gb 1.0] [--repeat 3] [--shard-mb 500] [--workdir DIR]
       [--skip-mergekit] [--skip-mergekit-ties] [--skip-double] [--keep]
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


def mergelab_cmd(method: str, base: Path, models: list[Path], out: Path, params: dict, shard_mb: int) -> list[str]:
    entry = [sys.executable, "-c", "from mergelab.cli import main; main()"]  # the `mergelab` command, this Python
    cmd = [*entry, "merge", "--method", method, "--base", str(base), "--out", str(out)]
    for m in models:
        cmd += ["--model", str(m)]
    for k, v in params.items():
        cmd += ["--param", f"{k}={v}"]
    return cmd + ["--max-shard-size", f"{shard_mb}MB"]


def mergekit_exe() -> Path | None:
    """``mergekit-yaml`` next to this Python, else in benchmarks/.peer-venv; None when neither has it."""
    for candidate in (Path(sys.executable).with_name("mergekit-yaml"),
                      Path(__file__).resolve().parent / ".peer-venv" / "bin" / "mergekit-yaml"):  # fmt: skip
        if candidate.exists():
            return candidate
    return None


def mergekit_cmd(exe: Path, method: str, base: Path, models: list[Path], out: Path, workdir: Path,
                 shard_mb: int) -> list[str]:  # fmt: skip
    params = {"weight": 0.3} if method == "task_arithmetic" else {"weight": 0.3, "density": 0.2}
    config = {
        "merge_method": method, "base_model": str(base), "dtype": "float32",
        "parameters": {"normalize": False} if method == "ties" else {},
        "models": [{"model": str(m), "parameters": params} for m in models],
    }  # fmt: skip
    cfg_path = workdir / f"mergekit-{method}.yaml"
    cfg_path.write_text(json.dumps(config))
    # mergekit's "500M" is 500 * 10**6 bytes, as mergelab's "500MB": equal shard sizes
    return [str(exe), str(cfg_path), str(out), "--out-shard-size", f"{shard_mb}M", "--no-copy-tokenizer"]


def repeated(label: str, cmd: list[str], out: Path, repeat: int) -> dict:
    """Run ``cmd`` ``repeat`` times (output removed before and after each); best wall time, spread, peak RSS."""
    walls, rss = [], []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        result = measure(cmd)
        shutil.rmtree(out, ignore_errors=True)
        walls.append(result["wall_s"])
        rss.append(result["peak_rss_mb"])
    row = {"run": label, "wall_s": min(walls), "spread_s": max(walls) - min(walls), "walls_s": walls,
           "peak_rss_mb": max(rss)}  # fmt: skip
    runs = ", ".join(f"{w:.1f}" for w in walls)
    print(f"  {label:<34} best {row['wall_s']:7.1f} s  spread {row['spread_s']:5.1f} s  "
          f"{row['peak_rss_mb']:8.0f} MB peak RSS  (runs: {runs} s)", flush=True)  # fmt: skip
    return row


def ratio_line(what: str, run: dict, ref: dict, target: str) -> str:
    return (f"  {what:<42} time {run['wall_s'] / ref['wall_s']:5.2f}x   "
            f"memory {run['peak_rss_mb'] / ref['peak_rss_mb']:5.2f}x   ({target})")  # fmt: skip


def print_ratios(runs: dict[str, dict]) -> None:
    floor, mk_ta, mk_ties = runs["floor"], runs.get("mk_ta"), runs.get("mk_ties")
    print("\nratios of best times (lower is better):")
    print(ratio_line("task_arithmetic / floor", runs["ta"], floor, "target time <= 1.3x"))
    print(ratio_line("ties per_tensor / floor", runs["tpt"], floor, "target time <= 2.0x"))
    print(ratio_line("ties global / floor", runs["tg"], floor, "target time <= 2.0x"))
    if mk_ta:
        print(ratio_line("task_arithmetic / mergekit task_arithmetic", runs["ta"], mk_ta,
                         "target time <= 0.8x, memory <= 1.0x"))  # fmt: skip
        print(ratio_line("mergekit task_arithmetic / floor", mk_ta, floor, "reference"))
    if mk_ties:
        print(ratio_line("ties per_tensor / mergekit ties", runs["tpt"], mk_ties, "target <= 1.0x"))
    if "tg2" in runs:
        print(ratio_line("ties global, 2x model size / 1x", runs["tg2"], runs["tg"], "target: memory flat, ~1.0x"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=1.0, help="fp32 size of each synthetic checkpoint (>= 3.0 for "
                        "the README figures)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement: best time and spread")
    parser.add_argument("--shard-mb", type=int, default=500, help="output shard size of both tools, in 10**6 bytes")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--skip-mergekit-ties", action="store_true", help="mergekit's TIES takes minutes at 3 GB")
    parser.add_argument("--skip-double", action="store_true", help="skip the global TIES run at twice the size")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mergelab-bench-"))
    exe = None if args.skip_mergekit else mergekit_exe()
    if not args.skip_mergekit and exe is None:
        print("mergekit-yaml not found (run `make bench`): skipping mergekit")
    runs: dict[str, dict] = {}
    try:
        small, large, out = workdir / "x1", workdir / "x2", workdir / "out"
        base, models, gb = write_family(small, args.size_gb)
        print(f"synthetic checkpoints: base + {len(models)} models, {gb:.2f} GB fp32 each, in {small}; "
              f"{args.repeat} run(s) each, {args.shard_mb} MB shards")  # fmt: skip

        def ml(method: str, params: dict) -> list[str]:
            return mergelab_cmd(method, base, models, out, params, args.shard_mb)

        floor_cmd = [sys.executable, "-c", _FLOOR, str(base), ",".join(map(str, models)), str(out)]
        runs["floor"] = repeated("floor (bare safetensors loop, TA)", floor_cmd, out, args.repeat)
        runs["ta"] = repeated("mergelab task_arithmetic", ml("task_arithmetic", {"scale": 0.3}), out, args.repeat)
        runs["tpt"] = repeated("mergelab ties per_tensor", ml("ties", {"scope": "per_tensor", "density": 0.2}), out,
                               args.repeat)  # fmt: skip
        runs["tg"] = repeated("mergelab ties global", ml("ties", {"scope": "global", "density": 0.2}), out, args.repeat)
        if exe is not None:
            for key, method in (("mk_ta", "task_arithmetic"), ("mk_ties", "ties"))[: 1 if args.skip_mergekit_ties else 2]:
                cmd = mergekit_cmd(exe, method, base, models, out, workdir, args.shard_mb)
                runs[key] = repeated(f"mergekit {method}", cmd, out, args.repeat if key == "mk_ta" else 1)
        shutil.rmtree(small) if not args.keep else None
        if not args.skip_double:
            base2, models2, gb2 = write_family(large, 2 * args.size_gb)
            print(f"doubled: {gb2:.2f} GB fp32 each")
            cmd = mergelab_cmd("ties", base2, models2, out, {"scope": "global", "density": 0.2}, args.shard_mb)
            runs["tg2"] = repeated("mergelab ties global (2x size)", cmd, out, 1)
        print_ratios(runs)
        (Path.cwd() / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
        (Path.cwd() / "benchmarks" / "results" / "merge_speed.json").write_text(json.dumps(list(runs.values()), indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
