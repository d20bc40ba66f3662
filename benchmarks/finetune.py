"""A short real fine-tuning run: MobileNetV2 (ImageNet) -> CIFAR-10 under four plans.

Plans: full fine-tuning; the classifier plus the last ``--blocks`` blocks (last-k); a sparse plan
made by the ``tinytrain`` selector and the budget search's plan (``--trials`` trials), both from
Fisher potentials of ``--fisher-samples`` training images, under a memory budget of
``--budget-fraction`` of full fine-tuning's training memory on ``--device`` at this batch size;
and the same last-k blocks gradient-filtered with r = 2 (filter mode ``corrected``). Each is
trained with :class:`budgetsearch.trainer.Trainer` (frozen batch norm, SGD with momentum 0.9, lr
0.001 for every plan: with frozen batch norm, lr 0.01 diverged for last-k and 0.002 did not learn
for full fine-tuning in our runs) from the same initial weights on the same seeded subset of
CIFAR-10 (the shared archive), and evaluated before training (epoch 0) and after every epoch.
Prints one table.

    .venv/bin/python benchmarks/finetune.py [--size 128] [--train 1000] [--val 500] [--epochs 3]
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from budgetsearch import CostModel, LayerGraph, Plan, load_model, load_profile, select
from budgetsearch.criteria import fisher_potential
from budgetsearch.data import load_dataset
from budgetsearch.search import Search
from budgetsearch.trainer import Trainer, tune_host_allocator


@torch.no_grad()
def accuracy(model: torch.nn.Module, data, batch_size: int) -> float:
    was = model.training
    model.eval()
    correct = 0
    for x, y in DataLoader(data, batch_size=batch_size):
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was)
    return correct / len(data)


def make_plans(model, graph: LayerGraph, train, args) -> dict[str, Plan]:
    cm = CostModel(graph, load_profile(args.device), batch_size=args.batch, optimizer="momentum")
    full = Plan.full(graph)
    memory = cm.summarize(dict(full.updates)).training_memory_bytes
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
    probe = DataLoader(Subset(train, order[: args.fisher_samples].tolist()), batch_size=16)
    scores = fisher_potential(model, probe, samples=args.fisher_samples)
    budget = int(memory * args.budget_fraction)
    sparse = select("tinytrain", cost_model=cm, budget_bytes=budget, scores=scores,
                    memory_measure="training")
    searched = Search(cost_model=cm, scores=scores, budget_bytes=budget,
                      memory_measure="training", seed=args.seed).run(n_trials=args.trials).plan
    return {
        "full": full,
        f"last-k ({args.blocks} blocks)": Plan.last_k_blocks(graph, args.blocks),
        "tinytrain (sparse)": sparse,
        "search": searched.with_(filter_mode="corrected"),
        f"last-k r=2 ({args.blocks} blocks)": Plan.last_k_blocks(
            graph, args.blocks, patch_size=2).with_(filter_mode="corrected"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.001,
                        help="learning rate of every plan (0.01 diverged for last-k, 0.002 did "
                             "not learn for full fine-tuning, in our runs with frozen BN)")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--device", default="rpi4")
    parser.add_argument("--budget-fraction", type=float, default=0.1)
    parser.add_argument("--fisher-samples", type=int, default=128)
    parser.add_argument("--trials", type=int, default=300, help="search trials (300)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="run directories (default: a temporary one)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    tune_host_allocator()
    kw = {"image_size": args.size, "normalization": "imagenet", "seed": args.seed}
    train = load_dataset("cifar10", split="train", limit=args.train, **kw)
    val = load_dataset("cifar10", split="test", limit=args.val, **kw)
    torch.manual_seed(args.seed)
    base = load_model("mobilenet_v2", weights="imagenet", num_classes=10)
    graph = LayerGraph.from_model(base, input_size=args.size, model_name="mobilenet_v2")
    start = accuracy(base, val, 2 * args.batch)
    plans = make_plans(base, graph, train, args)
    out = Path(args.out or tempfile.mkdtemp(prefix="finetune-"))
    print(f"MobileNetV2 ImageNet -> CIFAR-10, {args.size}px, {len(train)} train / {len(val)} val "
          f"images, {args.epochs} epochs, batch {args.batch}, SGD momentum 0.9, lr {args.lr}, "
          f"frozen BN, {args.threads} threads; accuracy before "
          f"training {start:.3f}; runs in {out}",
          flush=True)
    results = []
    for name, plan in plans.items():
        model = copy.deepcopy(base)
        began = time.perf_counter()
        lr = args.lr
        doc = Trainer(model, plan, train_data=train, val_data=val, epochs=args.epochs,
                      batch_size=args.batch, lr=lr, optimizer="momentum", seed=args.seed,
                      out_dir=out / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"),
                      progress=False,
                      check_budget=False).fit()
        minutes = (time.perf_counter() - began) / 60
        results.append((name, plan, doc, minutes))
        accs = " ".join(f"{r['val_accuracy']:.3f}" for r in doc["epochs"])
        print(f"  {name} (lr {lr:g}): val accuracy by epoch {accs} ({minutes:.1f} min)",
              flush=True)
    epochs = " ".join(f"{'ep' + str(e):>6}" for e in range(args.epochs + 1))
    header = (f"{'plan':<22}{'layers':>7}{'params':>10} {epochs}{'img/s':>8}{'saved MB':>10}"
              f"{'bwd ms':>8}{'min':>6}")
    print(header)
    print("-" * len(header))
    for name, plan, doc, minutes in results:
        accs = " ".join(f"{a:>6.3f}" for a in [start] + [r["val_accuracy"] for r in doc["epochs"]])
        last = doc["epochs"][-1]
        print(f"{name:<22}{len(plan.updates):>7}{last['trainable_params']:>10} {accs}"
              f"{doc['images_per_s']:>8.1f}{doc['saved_activation_bytes'] / 2**20:>10.1f}"
              f"{doc['backward_ms']:>8.0f}{minutes:>6.1f}")
    print("ep0: before training (new head); saved MB: activations autograd keeps for backward "
          "per step (measured); bwd ms: backward time per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
