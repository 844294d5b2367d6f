"""FT-Classifier on cached features vs the reference procedure (encoder forward on every step).

The reference code (fskong/FT-Classifier-for-Model-Merging) refits the head with batch 1 for 5 epochs and runs the
merged encoder (student) and the fine-tuned model (teacher) forward on every step. mergelab computes both encoders'
features once (cached) and refits the head on them. Both use the same k-shot samples, Adam(5e-4), 5 epochs, batch 1,
the same shuffling seed and eval-mode encoders, so the accuracies should agree; printed: wall time of each, the
speed-up (target >= 20x) and the accuracy difference (target within 1 point).

Usage: python benchmarks/protocol_speed.py [--task election] [--shots 5] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="election,rotten_tomatoes")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5, help="average over this many few-shot draws")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import mergelab
    from mergelab.bench.pool import fewshot_pool, resolve_base
    from mergelab.core.paths import default_cache_dir
    from mergelab.core.sampling import sample_per_class
    from mergelab.data.catalog import load_builtin_task
    from mergelab.evaluation.features import FeatureCache
    from mergelab.evaluation.protocols.common import ProtocolContext
    from mergelab.evaluation.protocols.registry import run_protocol
    from mergelab.finetune.experts import get_or_train_expert
    from mergelab.io.fingerprint import checkpoint_fingerprint, state_dict_fingerprint
    from mergelab.models.hf import load_encoder, load_task_model

    cache = args.cache_dir or default_cache_dir()
    base = resolve_base("minilm")
    names = args.tasks.split(",")
    tasks = {n: fewshot_pool(load_builtin_task(n, 600, 100, 300), 20, 0) for n in names}
    experts = {n: get_or_train_expert(cache / "experts", base, t, epochs=1.0, lr=1e-4, max_length=64, batch_size=32,
                                      seed=0, train_size=600, weight_decay=0.01, threads=args.threads)
               for n, t in tasks.items()}  # fmt: skip
    merged_state = mergelab.merge("task_arithmetic", base, list(experts.values()), scale=0.5).state
    merged = load_encoder(merged_state, base)
    features = FeatureCache(cache / "features", progress=False)
    print(f"FT-Classifier, {args.shots}-shot, {args.seeds} seeds (times summed, accuracies averaged over seeds)")
    print(f"{'task':<16} {'reference s':>11} {'cached s':>9} {'speed-up':>9} {'ref acc':>8} {'cached acc':>10} {'diff':>6}")
    for name, task in tasks.items():
        teacher = load_task_model(experts[name], label_names=task.label_names)
        ft = features.features(teacher.encoder, checkpoint_fingerprint(experts[name]), task, ("train", "test"), 64, 64)
        mg = features.features(merged, state_dict_fingerprint(merged_state), task, ("train", "test"), 64, 64)
        ref_times, ours_times, ref_accs, our_accs = [], [], [], []
        for seed in range(args.seeds):
            # mergelab: cached features (the encoder passes above are shared by every protocol, seed and shot count)
            start = time.perf_counter()
            ours = run_protocol("ft_classifier", ProtocolContext(name, mg, teacher.head, ft), seed=seed, shots=args.shots)
            ours_times.append(time.perf_counter() - start)
            our_accs.append(ours.accuracy)
            start = time.perf_counter()
            ref_accs.append(reference_refit(merged, teacher, task, mg, args.shots, seed, sample_per_class))
            ref_times.append(time.perf_counter() - start)
        ref_s, our_s = sum(ref_times), sum(ours_times)
        ref_acc, our_acc = sum(ref_accs) / len(ref_accs), sum(our_accs) / len(our_accs)
        print(f"{name:<16} {ref_s:11.1f} {our_s:9.2f} {ref_s / our_s:8.0f}x "
              f"{100 * ref_acc:8.1f} {100 * our_acc:10.1f} {100 * (our_acc - ref_acc):+6.1f}")  # fmt: skip


def reference_refit(merged, teacher, task, merged_features, shots: int, seed: int, sample_per_class) -> float:
    """The reference procedure: same samples and optimiser, both encoders forward on every step (batch 1)."""
    train = task.splits["train"]
    idx = sample_per_class(torch.tensor(train.labels), shots, seed).tolist()
    head = copy.deepcopy(teacher.head).train()
    optimizer = torch.optim.Adam(head.parameters(), lr=5e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(5):
        for i in torch.randperm(len(idx), generator=generator).tolist():
            batch = merged.tokenizer([train.texts[idx[i]]], truncation=True, max_length=64, return_tensors="pt")
            with torch.no_grad():
                student_feat = merged(**batch)
                teacher_logits = teacher.head(teacher.encoder(**batch))
            loss = F.kl_div(F.log_softmax(head(student_feat), -1), F.softmax(teacher_logits, -1), reduction="batchmean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    test = merged_features.split("test")
    with torch.no_grad():
        return float((head.eval()(test.features).argmax(1) == test.labels).float().mean())


if __name__ == "__main__":
    main()
