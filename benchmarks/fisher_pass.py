"""Benchmark: cost and stability of the streamed Fisher pass on MobileNetV2 / CIFAR-10 at 128 px.

For 32, 128 and 512 samples (nested: the smaller sets are prefixes of the larger), measures the
wall time and the pass's own peak memory (autograd's saved tensors plus hooked tensors, counted per
storage), and compares with the brute-force pass (every activation and gradient of the whole batch
kept) at 32 samples. Then the stability of the layer ranking: Spearman rank correlation of the
Fisher potential P_l, and of TinyTrain's cost-normalised score s_l, between sample counts.

Run: ``cd /work/main && PYTHONPATH=. .venv/bin/python benchmarks/fisher_pass.py`` (single thread;
a few minutes). Weights: ImageNet MobileNetV2 if its file is in the torch hub cache, else random
initialisation (announced loudly); the head is a new 10-class linear layer either way.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

from budgetsearch.criteria import fisher_bruteforce, fisher_potential, tinytrain_layer_scores
from budgetsearch.data import load_dataset
from budgetsearch.units import format_bytes


def build_model(num_classes: int = 10) -> tuple[nn.Module, str]:
    """MobileNetV2 with ImageNet weights if cached locally, and a fresh ``num_classes`` head."""
    torch.manual_seed(0)  # the random fallback and the new head are reproducible
    weights = MobileNet_V2_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if cached.is_file():
        model, origin = mobilenet_v2(weights=weights), f"ImageNet weights ({cached})"
    else:
        banner = "!" * 78
        print(f"{banner}\n!! {cached} is not in the torch hub cache:")
        print("!! FALLING BACK TO RANDOM INITIALISATION; rankings below are for a random model")
        print(banner)
        model, origin = mobilenet_v2(weights=None), "RANDOM INIT (no cached ImageNet weights)"
    model.classifier[1] = nn.Linear(model.last_channel, num_classes)
    return model, origin


def layer_costs(model: nn.Module, image_size: int) -> tuple[dict[str, int], dict[str, int]]:
    """Parameter count and forward MACs (batch 1) of every conv and linear layer."""
    params: dict[str, int] = {}
    macs: dict[str, int] = {}

    def make(name: str):
        def hook(module: nn.Module, _args, output: torch.Tensor) -> None:
            params[name] = sum(p.numel() for p in module.parameters(recurse=False))
            per_output = module.weight[0].numel()  # (C_in/G)·K² for a conv, C_in for a linear
            macs[name] = int(output[0].numel()) * per_output

        return hook

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(make(n)) for n, m in layers]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size))
    finally:
        for handle in handles:
            handle.remove()
    return params, macs


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    """Spearman rank correlation of two score mappings over their common keys (average ranks)."""
    keys = list(a)
    x = np.array([a[k] for k in keys])
    y = np.array([b[k] for k in keys])

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # average ranks of ties
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def top_overlap(a: dict[str, float], b: dict[str, float], k: int = 10) -> int:
    """How many of the top-k layers by ``a`` are also in the top-k by ``b``."""
    top = lambda s: set(sorted(s, key=s.__getitem__, reverse=True)[:k])  # noqa: E731
    return len(top(a) & top(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--brute-force-samples", type=int, default=32)
    parser.add_argument("--other-micro-batches", type=int, nargs="*", default=[1, 4])
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, origin = build_model()
    pool = max(args.samples)
    data = load_dataset("cifar10", split="train", image_size=args.image_size, limit=pool, seed=0)
    order = np.random.default_rng(0).permutation(len(data))  # mix classes: prefixes are samples
    xs, ys = zip(*data.__getitems__(order.tolist()), strict=True)
    x, y = torch.stack(xs), torch.tensor(ys)
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, pool, 64)]
    params, macs = layer_costs(model, args.image_size)
    print(f"model: MobileNetV2, {origin}; {len(params)} conv/linear layers")
    print(f"data: CIFAR-10 train, {pool} images (seeded), {args.image_size} px, imagenet norm")
    print(f"micro-batch {args.micro_batch}, cross-entropy summed over samples, 1 thread\n")

    fisher_potential(model, batches, samples=4, micro_batch=4)  # warm-up, not timed
    potentials: dict[int, dict[str, float]] = {}
    scores_s: dict[int, dict[str, float]] = {}
    rows = []
    for n in args.samples:
        start = time.perf_counter()
        scores = fisher_potential(model, batches, samples=n, micro_batch=args.micro_batch)
        seconds = time.perf_counter() - start
        potentials[n] = scores.layer_scores()
        scores_s[n] = tinytrain_layer_scores(potentials[n], params=params, macs=macs)
        rows.append(
            (f"streamed/{args.micro_batch}", n, seconds, scores.metadata["peak_memory_bytes"])
        )
    n_small = min(args.samples)
    for micro in args.other_micro_batches:
        start = time.perf_counter()
        scores = fisher_potential(model, batches, samples=n_small, micro_batch=micro)
        rows.append(
            (
                f"streamed/{micro}",
                n_small,
                time.perf_counter() - start,
                scores.metadata["peak_memory_bytes"],
            )
        )
    nb = args.brute_force_samples
    if nb:
        start = time.perf_counter()
        brute = fisher_bruteforce(model, x[:nb], y[:nb])
        rows.append(
            (
                f"brute force/{nb}",
                nb,
                time.perf_counter() - start,
                brute.metadata["peak_memory_bytes"],
            )
        )
        if nb in potentials:
            diff = max(
                abs(brute.layer_scores()[k] - v) / max(abs(v), 1e-30)
                for k, v in potentials[nb].items()
            )
            print(
                f"brute force vs streamed at {nb} samples: max relative difference of P_l "
                f"{diff:.2e} (float32)\n"
            )

    header = ("pass/micro-batch", "samples", "time (s)", "ms/sample", "peak memory")
    print(f"{header[0]:<16} {header[1]:>7} {header[2]:>9} {header[3]:>9} {header[4]:>12}")
    for kind, n, seconds, peak in rows:
        print(
            f"{kind:<16} {n:>7} {seconds:>9.2f} {1000 * seconds / n:>9.1f} {format_bytes(peak):>12}"
        )

    print(
        f"\n{'ranking stability':<20} {'Spearman P_l':>12} {'Spearman s_l':>12} "
        f"{'top-10 P_l':>10} {'top-10 s_l':>10}"
    )
    counts = sorted(potentials)
    for i, a in enumerate(counts):
        for b in counts[i + 1 :]:
            print(
                f"{f'{a} vs {b}':<20} {spearman(potentials[a], potentials[b]):>12.3f} "
                f"{spearman(scores_s[a], scores_s[b]):>12.3f} "
                f"{top_overlap(potentials[a], potentials[b]):>7}/10 "
                f"{top_overlap(scores_s[a], scores_s[b]):>7}/10"
            )
    last = potentials[counts[-1]]
    top = sorted(scores_s[counts[-1]], key=scores_s[counts[-1]].get, reverse=True)[:5]
    print(f"\ntop-5 layers by s_l at {counts[-1]} samples: {', '.join(top)}")
    print(f"largest P_l at {counts[-1]} samples: {max(last, key=last.get)}")


if __name__ == "__main__":
    main()
