"""Benchmark: validation accuracy of the race's candidates after 1, 2, 4 and 6 epochs.

Why the race's first rung is 2 epochs: successive halving drops arms on their first-rung score,
which is only fair if that score ranks plans as the full schedule does. For MCUNet-5fps (ImageNet
weights, new 10-class head, seed 0) on CIFAR-10 at 128 px (1,000 training images, class-balanced,
20 % held out for validation, as ``budgetsearch plan`` draws them) at one budget of training
memory on the STM32F746, it gathers the race's candidates (the standard effort's front points
and every baseline) and trains each at lr 0.02 for 1, 2, 4 and 6 epochs and at 0.00667 and 0.06
for 2 and 4 (SGD, batch 32), printing the validation accuracies.

Run: ``.venv/bin/python benchmarks/learning_curves.py --budget 148`` (about 4 minutes with the
contribution table cached by ``budgetsearch plan``; results of the committed run are in
``studies/results/learning_curves/``).
"""

from __future__ import annotations

import argparse

import torch

from budgetsearch import CostModel, LayerGraph, load_model, load_profile
from budgetsearch.contrib import (
    PlanRunner,
    analyse,
    analysis_key,
    default_table_path,
    split_tensors,
)
from budgetsearch.criteria import fisher_potential, magnitude_scores
from budgetsearch.data import default_normalization
from budgetsearch.planner import race_candidates
from budgetsearch.recipe import Recipe
from budgetsearch.search import Search, scores_digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mcunet-5fps")
    parser.add_argument("--budget", type=int, default=148, help="KB of training memory")
    args = parser.parse_args()
    torch.manual_seed(0)
    name = args.model
    model = load_model(name, weights="imagenet", num_classes=10)
    graph = LayerGraph.from_model(model, input_size=128, model_name=name)
    train, val = split_tensors("cifar10", graph=graph, normalization=default_normalization(name),
                               samples=1000, val_fraction=0.2, seed=0)
    mag = magnitude_scores(model)
    key = analysis_key(graph=graph, state=model.state_dict(), train=train, val=val,
                       recipe=Recipe(seed=0), scores_digest=scores_digest(mag))
    table = analyse(model, graph=graph, train=train, val=val, recipe=Recipe(seed=0), scores=mag,
                    candidates="top:6", path=str(default_table_path(key, candidates="top:6")),
                    progress=False)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(train[0][:64], train[1][:64]), batch_size=16)
    fisher = fisher_potential(model, loader, samples=64)
    cm = CostModel(graph, load_profile("stm32f746"), accounting="device", optimizer="sgd")
    search = Search(cost_model=cm, scores=mag, budget_bytes=args.budget * 1024,
                    memory_measure="training", contributions=table.results, seed=0)
    result = search.run(n_trials=100)
    candidates, _ = race_candidates(search, result, front=4, model=model,
                                    baseline_scores=fisher)
    runner = PlanRunner(model, graph=graph, train=train, val=val)
    print(f"{name} at {args.budget} KB: validation accuracy at lr/epochs")
    for c in candidates:
        row = []
        for lr in (0.00667, 0.02, 0.06):
            for epochs in (1, 2, 4, 6):
                if lr != 0.02 and epochs in (1, 6):
                    continue
                r = runner.run(c.updates, Recipe(optimizer="sgd", lr=lr, epochs=epochs,
                                                 batch_size=32, seed=0))
                row.append(f"{lr:g}/{epochs}:{r['val_accuracy']:.3f}")
        print(f"{c.name:<18}", " ".join(row), flush=True)


if __name__ == "__main__":
    main()
