"""What a cell works with, loaded on first use and cached per process.

:class:`CellContext` gives the cell's model (a fresh copy with a classifier for the data's
classes), its traced graph, the study's cost model on the cell's device, the training and
validation subsets and the channel scores. Models, data sets and Fisher scores are cached per
process (a worker runs many cells of the same model and data), so only the first cell of a model
pays for loading and the Fisher pass; a fake plan or train function (as in the tests) loads nothing.
"""

from __future__ import annotations

import copy
import dataclasses
from functools import cached_property
from pathlib import Path
from typing import Any

from .spec import Cell

__all__ = ["CellContext"]

_MODELS: dict[tuple, Any] = {}
_DATA: dict[tuple, Any] = {}
_SCORES: dict[tuple, Any] = {}
_RUNNERS: dict[tuple, Any] = {}


class CellContext:
    """What a cell works with, loaded on first use.

    Args:
        cell: The cell.
        out_dir: The cell's own directory (plan, trainer output, front CSV).
        storage: The study's storage URL (passed to the search), or None.
        progress: Whether the trainer and the search may show progress bars.
    """

    def __init__(self, cell: Cell, *, out_dir: Path, storage: str | None = None,
                 progress: bool = False) -> None:
        self.cell = cell
        self.out_dir = Path(out_dir)
        self.storage = storage
        self.progress = progress
        #: Facts the plan function adds to the record (``front_csv``, ``proxy``, ``search``...).
        self.extras: dict[str, Any] = {}

    # ------------------------------------------------------------------------------ loading
    @cached_property
    def normalization(self) -> str:
        """``mcu`` for models expecting ``(x/255 − 0.5)·2`` inputs, else ``imagenet``."""
        from ..data import NORMALIZATIONS
        from ..models import input_spec

        spec = input_spec(self.cell.model.name)
        mcu = NORMALIZATIONS["mcu"]
        return "mcu" if (tuple(spec.mean), tuple(spec.std)) == mcu else "imagenet"

    def _dataset(self, split: str, size: int | None, per_class: int | None) -> Any:
        from ..data import load_dataset

        d = self.cell.data
        key = (d.source, split, self.cell.study.input_size, self.normalization, size, per_class,
               d.seed)
        if key not in _DATA:
            _DATA[key] = load_dataset(d.source, split=split, image_size=key[2],
                                      normalization=key[3], limit=size, per_class=per_class,
                                      seed=d.seed)
        return _DATA[key]

    @cached_property
    def _splits(self) -> tuple[Any, Any]:
        """(training, validation): the draw of the training split, minus a stratified
        ``val_fraction`` held out for validation; or, for a legacy variant, the whole draw and
        ``val_split``'s draw."""
        from ..data import split_validation

        d = self.cell.data
        draw = self._dataset(d.train_split, d.train_size, d.per_class)
        if d.legacy:
            return draw, self._dataset(str(d.val_split), d.val_size, None)
        key = ("carved", id(draw), d.val_fraction or 0.2, d.seed)
        if key not in _DATA:
            _DATA[key] = split_validation(draw, fraction=d.val_fraction or 0.2, seed=d.seed)
        return _DATA[key]

    @cached_property
    def train_data(self) -> Any:
        """The training data."""
        return self._splits[0]

    @cached_property
    def val_data(self) -> Any:
        """The validation data every choice (the best epoch) is made on."""
        return self._splits[1]

    @cached_property
    def test_data(self) -> Any:
        """The test data, only reported (None for a legacy variant, which validates on it)."""
        d = self.cell.data
        if d.legacy:
            return None
        return self._dataset(d.test_split or "test", d.test_size, None)

    @cached_property
    def model(self) -> Any:
        """A fresh copy of the model with a classifier for the data's classes, the classifier
        initialised from the cell's seed alone (so every method of a seed starts from the same
        head, whatever ran before in the process)."""
        return self.model_for_seed(self.cell.seed)

    def model_for_seed(self, seed: int) -> Any:
        """A fresh copy of the model with the classifier of another seed (a plan made with a
        fixed seed is made on that seed's model, whatever seed trains it)."""
        import torch

        from ..models import load_model

        m = self.cell.model
        key = (m.name, m.weights, m.mcu_dir, len(self.train_data.classes), seed)
        if key not in _MODELS:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                _MODELS[key] = load_model(m.name, weights=m.weights, num_classes=key[3],
                                          mcu_dir=m.mcu_dir)
        return copy.deepcopy(_MODELS[key])

    @property
    def runner(self) -> Any:
        """The planner's :class:`~budgetsearch.contrib.PlanRunner` on the cell's model, training
        and validation data (the test split as extra data, only reported), kept per process
        for the cells of the same model, data and seed so that its frozen-prefix cache is
        reused (runners of other models are dropped)."""
        import dataclasses

        from ..contrib import PlanRunner, load_tensors

        c = self.cell
        key = (c.model.name, c.model.weights, c.model.mcu_dir, dataclasses.astuple(c.data),
               c.study.input_size, c.seed)
        if key not in _RUNNERS:
            for other in [k for k in _RUNNERS if k[:3] != key[:3]]:
                del _RUNNERS[other]
            test = self.test_data
            _RUNNERS[key] = PlanRunner(
                self.model, graph=self.graph, train=load_tensors(self.train_data),
                val=load_tensors(self.val_data),
                extra=None if test is None else {"test": load_tensors(test)})
        return _RUNNERS[key]

    @cached_property
    def graph(self) -> Any:
        """The traced model at the study's input size."""
        from ..graph import LayerGraph

        return LayerGraph.from_model(self.model, input_size=self.cell.study.input_size,
                                     model_name=self.cell.model.name)

    @cached_property
    def cost_model(self) -> Any:
        """The cost model of the study's accounting on the cell's device."""
        return self.cost_model_with(**self.cell.study.cost)

    def cost_model_with(self, *, accounting: str, batch_size: int | None, optimizer: str | None,
                        **_: Any) -> Any:
        """A cost model of the cell's model and device with other settings."""
        import warnings

        from ..cost import CostModel
        from ..profiles import load_profile

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown-op warnings: once is enough (cost_model)
            return CostModel(self.graph, load_profile(self.cell.device), accounting=accounting,
                             batch_size=batch_size, optimizer=optimizer)

    def scores(self, criterion: str, *, seed: int | None = None) -> Any:
        """The model's scores under a criterion (``fisher`` computed on the training data,
        cached per process), or None for ``none``; with ``seed``, of that seed's model (its
        classifier) instead of the cell's."""
        from ..criteria import fisher_potential, magnitude_scores, random_scores

        if criterion == "none":
            return None
        seed = self.cell.seed if seed is None else seed
        model = self.model if seed == self.cell.seed else self.model_for_seed(seed)
        if criterion == "magnitude":
            return magnitude_scores(model)
        if criterion == "random":
            return random_scores(model, seed=seed)
        import torch

        c, s = self.cell, self.cell.study.scores
        n = min(int(s["fisher_samples"]), len(self.train_data))
        key = (dataclasses.astuple(c.data), c.model.name, c.model.weights, c.study.input_size, n,
               seed)
        if key not in _SCORES:
            loader = torch.utils.data.DataLoader(self.train_data, batch_size=s["micro_batch"])
            _SCORES[key] = fisher_potential(model, loader, samples=n,
                                            micro_batch=s["micro_batch"])
        return _SCORES[key]

    def proxy(self, plan: Any) -> float | None:
        """The search's accuracy proxy (captured Fisher potential) of any plan, with the study's
        search options ``alpha`` and ``bias_credit``; None if the search is not available."""
        try:
            from ..search import ProxyModel
        except ImportError:
            return None
        opts = self.cell.study.search
        model = ProxyModel(self.graph, self.scores("fisher"), alpha=opts.get("alpha", 1.0),
                           bias_credit=opts.get("bias_credit", 0.25))
        return float(model(dict(plan.updates)))
