"""The plan-driven trainer: a small, deterministic, resumable training loop around apply_plan.

Run directory (``out_dir``): ``metrics.json`` / ``metrics.csv`` (see :mod:`.metrics`),
``checkpoints/epoch-NNNN.{safetensors,json}`` (see :mod:`.checkpoint`; the last two kept),
``plan.json`` (the plan in force at the end) and ``model.safetensors`` (final weights, plain
state-dict keys).

Determinism: ``fit`` seeds torch and Python's ``random`` with ``seed``; each epoch's shuffling uses
its own generator seeded from (seed, epoch), so a resumed run draws the same batches; dropout draws
from the global RNG, whose state is checkpointed. Data loading runs in the main process. Results are
bit-identical for a fixed number of threads (``threads``) and the same CPU kernels (the run's
``config.kernels``, :func:`budgetsearch._threads.cpu_kernels`); CPU kernels may sum in another
order with another thread count, and AVX2 and AVX-512 kernels round differently. Each epoch row
records the thread count and kernels it trained with (``threads``, ``kernels``), and resuming a
run under others warns, naming the epochs that trained otherwise.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .._io import atomic_path
from .._threads import cpu_kernels, same_kernels, torch_threads
from ..budget import Budget
from ..choices import OPTIMIZERS
from ..errors import PlanError
from ..graph import LayerGraph
from ..plan import Plan
from . import checks
from .apply import PlanHandle, active_plan, apply_plan
from .checkpoint import (
    list_checkpoints,
    load_latest,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    rng_state,
    save_checkpoint,
    set_aside_after,
    set_rng_state,
)
from .checks import (
    build_cost_model,
    check_classes,
    check_trainer_args,
    fisher_batches,
    probe_inputs,
)
from .dynamic import Replanner
from .errors import TrainingError
from .measure import SavedTensorMeter
from .metrics import epoch_line, summarize, write_metrics

__all__ = ["Trainer", "build_optimizer"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def build_optimizer(
    name: str, groups: list[dict[str, Any]], *, lr: float, momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer | None:
    """``sgd`` (no momentum), ``momentum`` (SGD with momentum) or ``adam`` over the groups; None
    when there is nothing to train."""
    if not groups:
        return None
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    raise PlanError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {name!r}")


class _Diverged(Exception):
    def __init__(self, step: int, value: float) -> None:
        super().__init__(step, value)
        self.step, self.value = step, value


class Trainer:
    """Train a model under a plan; see the module docstring for the files it writes.

    All checks run at construction, before any training: a plan for another model
    (:class:`~budgetsearch.errors.PlanError`), data whose classes do not match the head
    (:class:`~budgetsearch.errors.DataError`), a plan whose budget the batch size or input size
    exceed (:class:`~budgetsearch.errors.BudgetError`).

    Args:
        model: The plain model (no plan applied); trained in place, returned plain by :meth:`fit`.
        plan: The plan (for dynamic modes: the initial one).
        train_data: Map-style data set of ``(image, label)``.
        val_data: Validation data set, evaluated after every epoch (None: no evaluation); the
            best epoch is chosen on it. Carve it out of the training data
            (:func:`budgetsearch.data.split_validation`), not from the test split.
        test_data: Test data set, evaluated after every epoch and only reported
            (``test_accuracy`` per epoch, ``test_accuracy_at_best_epoch``,
            ``final_test_accuracy``); None: none.
        epochs: Total number of epochs.
        out_dir: Run directory.
        batch_size: Batch size; the plan's by default.
        lr: Learning rate.
        optimizer: ``sgd``, ``momentum`` or ``adam``; the plan's by default.
        momentum: Momentum of ``momentum``.
        weight_decay: Weight decay.
        seed: Seed of everything random.
        dynamic: None, ``"neq"`` or ``"fisher"``: re-select channels every ``every`` epochs.
        every: Epochs between re-selections.
        budget_bytes: Budget of re-selections; the plan's memory budget by default.
        cost_model: Cost model for the budget check and re-selections; by default the plan's
            device at this batch size, input size and optimizer, ``accounting``.
        accounting: Cost-model accounting (``device``, ``ops`` or ``pytorch``); the one the
            plan was costed with (its provenance's ``accounting``) by default, else ``device``.
        bn: ``"frozen"`` or ``"train"`` (see :func:`~budgetsearch.trainer.apply_plan`).
        filter_mode: Gradient-filter variant; the plan's by default.
        check_budget: Refuse a plan whose budget these settings exceed.
        progress: Show a progress bar.
        threads: ``torch.set_num_threads`` during :meth:`fit` (restored after); None leaves it.
        neq_probe_samples: Validation samples NEq records outputs on (memory: these samples times
            every layer's output, kept between epochs and checkpointed).
        fisher_samples: Training samples of each Fisher pass.
        replan_method: ``auto``, ``search`` or ``selector``: who picks re-selected plans (see
            :mod:`.dynamic`).
        search_trials: Trials of each search re-plan.
        search_replan: The re-planning function of ``replan_method`` ``search`` (and of
            ``auto`` when given), e.g. :func:`budgetsearch.search.replan`; the trainer does not
            import the search itself.
        loss_fn: ``loss(logits, labels)``, mean-reduced; cross-entropy by default.
    """

    def __init__(
        self, model: nn.Module, plan: Plan, *, train_data: Dataset, val_data: Dataset | None,
        epochs: int, out_dir: str | Path, test_data: Dataset | None = None,
        batch_size: int | None = None, lr: float = 0.01,
        optimizer: str | None = None, momentum: float = 0.9, weight_decay: float = 0.0,
        seed: int = 0, dynamic: str | None = None, every: int = 1,
        budget_bytes: int | None = None, cost_model: Any = None, accounting: str | None = None,
        bn: str = "frozen", filter_mode: str | None = None, check_budget: bool = True,
        progress: bool = True, threads: int | None = None, neq_probe_samples: int = 16,
        fisher_samples: int = 64, replan_method: str = "auto", search_trials: int = 100,
        search_replan: Any = None, loss_fn: LossFn | None = None,
    ) -> None:
        self.model, self.plan = model, plan
        self.train_data, self.val_data, self.test_data = train_data, val_data, test_data
        self.epochs, self.out_dir = int(epochs), Path(out_dir)
        self.batch_size = int(batch_size or plan.batch_size)
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), weight_decay
        self.optimizer_name = optimizer or plan.optimizer
        self.seed, self.dynamic, self.every = int(seed), dynamic, int(every)
        self.bn, self.filter_mode, self.progress, self.threads = bn, filter_mode, progress, threads
        self.loss_fn = loss_fn or F.cross_entropy
        check_trainer_args(self)
        if active_plan(model) is not None:
            raise PlanError("the model already has a plan applied; give the Trainer the plain "
                            "model (remove the plan first)")
        if len(train_data) == 0:
            raise PlanError("the training data is empty")
        shape = tuple(train_data[0][0].shape)
        if len(shape) != 3:
            raise PlanError(f"training samples must be C x H x W images; got shape {shape}")
        self.graph = LayerGraph.from_model(model, input_size=shape[1:], in_channels=shape[0],
                                           model_name=plan.model)
        plan.validate(self.graph)
        self.num_classes = check_classes(train_data, val_data, self.graph)
        if test_data is not None:
            check_classes(train_data, test_data, self.graph, other="test")
        # A plan's recipe may train at another batch size than the device's (a planner races
        # plans on a host at batch 32 for a microcontroller that steps at batch 1): training
        # with the recipe's batch is training the plan, and its budget is the device's, at the
        # plan's own batch size.
        device_batch = (plan.batch_size if plan.recipe is not None
                        and self.batch_size == plan.recipe.batch_size else self.batch_size)
        self.cost_model = cost_model or build_cost_model(
            plan, self.graph, batch_size=device_batch, optimizer=self.optimizer_name,
            bn_train=bn == "train",
            accounting=accounting or plan.provenance.get("accounting") or "device")
        self.budget = checks.check_budget(plan, self.cost_model) if check_budget else None
        if self.budget is not None:
            self.budget["batch_size"] = self.cost_model.batch
        self.replanner: Replanner | None = None
        if dynamic is not None:
            budget = budget_bytes or plan.memory_budget_bytes
            if self.cost_model is None or budget is None:
                raise PlanError(f"dynamic {dynamic} re-selects under the plan's budget, but the "
                                "plan names no device or memory budget; pass cost_model= and "
                                "budget_bytes=")
            self.replanner = Replanner(
                dynamic, cost_model=self.cost_model,
                budget=Budget(memory_bytes=budget, measure=Budget.from_plan(plan).measure),
                probe=probe_inputs(val_data or train_data, neq_probe_samples) if dynamic == "neq"
                else None,
                fisher_batches=fisher_batches(train_data, fisher_samples, self.seed)
                if dynamic == "fisher" else (), seed=self.seed, method=replan_method,
                search_trials=search_trials, search_replan=search_replan)

    # ---------------------------------------------------------------------------------- fit
    def fit(self, *, resume: bool = False) -> dict[str, Any]:
        """Train; returns the metrics document (also in ``out_dir/metrics.json``).

        Args:
            resume: Continue from the last checkpoint in ``out_dir`` (from scratch if there is
                none).

        Raises:
            TrainingError: The loss became NaN/inf (the last good checkpoint is kept), or
                ``out_dir`` holds another run's checkpoints and ``resume`` is False.
        """
        with torch_threads(self.threads or None):
            return self._fit(resume=resume)

    def _fit(self, *, resume: bool) -> dict[str, Any]:
        """:meth:`fit` at the thread count it set."""
        ckpt_dir = self.out_dir / "checkpoints"
        if not resume and list_checkpoints(ckpt_dir):
            raise TrainingError(f"{self.out_dir} already holds checkpoints of a run; resume it "
                                "(resume=True, --resume) or choose another output directory")
        ckpt = load_latest(ckpt_dir) if resume else None
        if resume and ckpt is None:
            warnings.warn(f"no checkpoint in {ckpt_dir}; starting from scratch", stacklevel=2)
        if resume:  # damaged checkpoints newer than the one resumed from: kept, out of the way
            for aside in set_aside_after(ckpt_dir, ckpt.epoch if ckpt is not None else 0):
                warnings.warn(f"set aside the damaged checkpoint {aside}", stacklevel=2)
        # each epoch row records the thread count and kernels it trained with, so that a run
        # resumed under others says which epochs trained how
        config = {"threads": torch.get_num_threads(), "kernels": cpu_kernels()}
        plan, rows, start = self.plan, [], 0
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        if self.replanner is not None:
            self.replanner.start(self.model)
        if ckpt is not None:
            plan = Plan.from_dict(ckpt.state["plan"], source=str(ckpt.path))
            plan.validate(self.graph)
            recorded = ckpt.state.get("config") or {}
            _refuse_other_settings(ckpt.path, recorded, self._config(),
                                   None if self.replanner is not None else (plan, self.plan))
            if recorded.get("lr") is not None and recorded["lr"] != self.lr:
                warnings.warn(f"{self.out_dir}: resuming a run trained at lr "
                              f"{recorded['lr']:g} at lr {self.lr:g} (each epoch row records "
                              "its rate)", stacklevel=3)
            self.model.load_state_dict(ckpt.section("model"))
            rows, start = list(ckpt.state.get("epochs", [])), ckpt.epoch
            other = _other_configurations(rows, config, ckpt.state.get("config") or {})
            if other and start < self.epochs:
                warnings.warn(
                    f"{self.out_dir}: resuming a run whose {other}; this process trains with "
                    f"{config['threads']} thread(s) on {config['kernels']}, so the run will not "
                    "repeat an uninterrupted one bit for bit (each epoch row records its own "
                    "threads and kernels)", stacklevel=3)
            if self.replanner is not None:
                self.replanner.load_state(ckpt.section("dynamic"), ckpt.state.get("dynamic", {}))
        elif self.replanner is not None:
            self.replanner.record(self.model, self.graph)
        bar = tqdm(total=self.epochs * self._steps(), initial=start * self._steps(),
                   disable=not self.progress, unit="step", dynamic_ncols=True)
        handle = None
        try:
            handle = apply_plan(self.model, plan, filter_mode=self.filter_mode, bn=self.bn,
                                graph=self.graph)
            doc = self._document(plan, rows, "running")
            opt = self._optimizer(handle)
            if ckpt is not None:
                if opt is not None:
                    optimizer_state_from_tensors(opt, ckpt.section("optimizer"),
                                                 ckpt.state.get("optimizer", {}))
                set_rng_state(ckpt.section("rng"), ckpt.state.get("rng", {}))
            for epoch in range(start, self.epochs):
                bar.set_description(f"epoch {epoch + 1}/{self.epochs}")
                try:
                    row = self._train_epoch(epoch, opt, bar)
                except _Diverged as exc:
                    doc = self._diverged(plan, rows, epoch, exc, ckpt_dir)
                    raise TrainingError(doc["reason"], epoch=epoch + 1, step=exc.step,
                                        checkpoint=_last(ckpt_dir)) from None
                row.update(self._evaluate(self.val_data, "val"))
                if self.test_data is not None:
                    row.update(self._evaluate(self.test_data, "test"))
                row.update(trainable_params=handle.trainable_params,
                           updated_layers=len(plan.updates), replanned=False, lr=self.lr,
                           **config)
                if self.replanner is not None:
                    self.replanner.record(self.model, self.graph)
                    if (epoch + 1) % self.every == 0 and epoch + 1 < self.epochs:
                        plan, handle, opt, row["replanned"] = self._replan(plan, handle, opt,
                                                                           epoch + 1)
                rows.append(row)
                self._checkpoint(ckpt_dir, epoch + 1, plan, rows, opt)
                doc = self._document(plan, rows, "running")
                write_metrics(self.out_dir, doc)
                if self.progress:
                    bar.write(epoch_line(row, self.epochs))
            doc = self._document(plan, rows, "completed")
            write_metrics(self.out_dir, doc)
            plan.save(self.out_dir / "plan.json")
            with atomic_path(self.out_dir / "model.safetensors") as tmp:
                save_file({k: v.detach().contiguous().clone() for k, v in
                           self.model.state_dict().items()}, str(tmp))
        except Exception as exc:
            if not (isinstance(exc, TrainingError) and exc.epoch is not None):  # not diverged
                failed = self._document(plan, rows, "failed")  # (a divergence wrote its own)
                failed["reason"] = f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(Exception):  # the error itself matters more
                    write_metrics(self.out_dir, failed)
            raise
        finally:
            bar.close()
            if handle is not None:
                handle.remove()
        return doc

    # ------------------------------------------------------------------------------ pieces
    def _steps(self) -> int:
        return math.ceil(len(self.train_data) / self.batch_size)

    def _optimizer(self, handle: PlanHandle) -> torch.optim.Optimizer | None:
        return build_optimizer(self.optimizer_name, handle.param_groups(), lr=self.lr,
                               momentum=self.momentum, weight_decay=self.weight_decay)

    def _train_epoch(self, epoch: int, opt: torch.optim.Optimizer | None, bar: tqdm) -> dict:
        model = self.model
        model.train()
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        loader = DataLoader(self.train_data, batch_size=self.batch_size, shuffle=True,
                            generator=gen, num_workers=0)
        seen = correct = 0
        loss_sum = fwd = bwd = step_t = 0.0
        saved = 0
        start = time.perf_counter()
        for step, (x, y) in enumerate(loader, 1):
            t0 = time.perf_counter()
            if step == 1:
                with SavedTensorMeter.for_model(model) as meter:
                    out = model(x)
                    loss = self.loss_fn(out, y)
                saved = meter.bytes
            else:
                out = model(x)
                loss = self.loss_fn(out, y)
            if not torch.isfinite(loss.detach()):
                raise _Diverged(step, float(loss.detach()))
            t1 = time.perf_counter()
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
            t2 = time.perf_counter()
            if opt is not None:
                opt.step()
            t3 = time.perf_counter()
            n = int(y.shape[0])
            seen += n
            loss_sum += float(loss.detach()) * n
            correct += int((out.detach().argmax(1) == y).sum())
            fwd, bwd, step_t = fwd + t1 - t0, bwd + t2 - t1, step_t + t3 - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}",
                            img_s=f"{seen / (time.perf_counter() - start):.1f}")
        wall = time.perf_counter() - start
        steps = max(1, math.ceil(seen / self.batch_size))
        return {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen),
                "train_accuracy": correct / max(1, seen), "images_per_s": seen / wall,
                "epoch_s": wall, "step_ms": 1e3 * step_t / steps, "forward_ms": 1e3 * fwd / steps,
                "backward_ms": 1e3 * bwd / steps, "saved_activation_bytes": saved}

    @torch.no_grad()
    def _evaluate(self, data: Dataset | None, prefix: str) -> dict[str, float | None]:
        if data is None or len(data) == 0:
            return {f"{prefix}_loss": None, f"{prefix}_accuracy": None}
        was = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            loader = DataLoader(data, batch_size=self.batch_size, shuffle=False)
            seen = correct = 0
            loss_sum = 0.0
            for x, y in loader:
                out = self.model(x)
                loss_sum += float(self.loss_fn(out, y)) * int(y.shape[0])
                correct += int((out.argmax(1) == y).sum())
                seen += int(y.shape[0])
        finally:
            for module, mode in was.items():
                module.training = mode
        return {f"{prefix}_loss": loss_sum / seen, f"{prefix}_accuracy": correct / seen}

    def _replan(self, plan: Plan, handle: PlanHandle, opt: Any, epoch: int) -> tuple:
        assert self.replanner is not None
        if self.replanner.kind == "neq" and not self.replanner.tracker.ready:  # type: ignore
            self.replanner.replan(self.model, plan, epoch=epoch)  # records why it kept the plan
            return plan, handle, opt, False
        handle.remove()
        new = self.replanner.replan(self.model, plan, epoch=epoch)
        handle = apply_plan(self.model, new or plan, filter_mode=self.filter_mode, bn=self.bn,
                            graph=self.graph)
        fresh = self._optimizer(handle)
        if new is None and fresh is not None and opt is not None:
            fresh.load_state_dict(opt.state_dict())  # same plan: same parameters, same order
        return new or plan, handle, fresh, new is not None

    def _checkpoint(self, ckpt_dir: Path, epoch: int, plan: Plan, rows: list, opt: Any) -> None:
        tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        state: dict[str, Any] = {"plan": plan.to_dict(), "epochs": rows, "config": self._config()}
        if opt is not None:
            opt_t, state["optimizer"] = optimizer_state_to_tensors(opt)
            tensors.update({f"optimizer/{k}": v for k, v in opt_t.items()})
        rng_t, state["rng"] = rng_state()
        tensors.update({f"rng/{k}": v for k, v in rng_t.items()})
        if self.replanner is not None:
            dyn_t, state["dynamic"] = self.replanner.state()
            tensors.update({f"dynamic/{k}": v for k, v in dyn_t.items()})
        save_checkpoint(ckpt_dir, epoch=epoch, tensors=tensors, state=state)

    def _diverged(self, plan: Plan, rows: list, epoch: int, exc: _Diverged,
                  ckpt_dir: Path) -> dict:
        last = _last(ckpt_dir)
        kept = (f"the last good checkpoint is {last} (epoch {rows[-1]['epoch']})" if last and rows
                else "no checkpoint had been written yet")
        reason = (f"the training loss became {exc.value} at epoch {epoch + 1}, step {exc.step} "
                  f"(lr {self.lr:g}, {self.optimizer_name}); training stopped and {kept}. "
                  "Lower the learning rate, then resume (--resume) or start again")
        doc = self._document(plan, rows, "diverged")
        doc["reason"] = reason
        write_metrics(self.out_dir, doc)
        return doc

    def _config(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                "optimizer": self.optimizer_name, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "seed": self.seed, "dynamic": self.dynamic,
                "every": self.every,
                "replan_method": self.replanner.method if self.replanner else None,
                "bn": self.bn, "filter_mode": self.filter_mode,
                "threads": self.threads, "kernels": cpu_kernels(),
                "train_samples": len(self.train_data),
                "val_samples": len(self.val_data) if self.val_data is not None else 0,
                "test_samples": len(self.test_data) if self.test_data is not None else 0,
                "input_size": list(self.graph.input_shape[1:])}

    def _document(self, plan: Plan, rows: list, status: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"status": status, "reason": None, "model": plan.model,
                               "config": self._config(),
                               "plan": {"fingerprint": plan.fingerprint, "device": plan.device,
                                        "memory_budget_bytes": plan.memory_budget_bytes,
                                        "updated_layers": len(plan.updates),
                                        "method": plan.provenance.get("method")},
                               "budget_check": self.budget, "epochs": rows}
        if self.replanner is not None:
            doc["dynamic"] = self.replanner.history
        doc.update(summarize(rows))
        return doc


def _other_configurations(rows: list[dict[str, Any]], config: dict[str, Any],
                          recorded: dict[str, Any]) -> str:
    """Which of the checkpoint's epochs trained with another thread count or other kernels
    than ``config`` ("" when none did, or when neither the rows nor the checkpoint's
    ``recorded`` config say). Rows written before epochs recorded them take the checkpoint's
    config (its ``threads`` is the requested count, None when the run left it as it was);
    kernels are compared with :func:`~budgetsearch._threads.same_kernels`."""
    other: dict[tuple[Any, Any], list[int]] = {}
    for row in rows:
        threads = row.get("threads", recorded.get("threads"))
        kernels = row.get("kernels", recorded.get("kernels"))
        if kernels is None:
            continue
        same_threads = threads is None or threads == config["threads"]
        if not (same_threads and same_kernels(kernels, config["kernels"])):
            other.setdefault((threads, kernels), []).append(int(row["epoch"]))
    return "; ".join(f"epoch(s) {', '.join(map(str, epochs))} trained with "
                     f"{threads if threads is not None else '?'} thread(s) on {kernels}"
                     for (threads, kernels), epochs in other.items())


#: Settings a resumed run must share with its checkpoint (the learning rate may change: a run
#: that diverged resumes from its last good checkpoint at a lower rate; the epochs may grow).
RESUME_SETTINGS = ("optimizer", "momentum", "weight_decay", "batch_size", "seed", "dynamic",
                   "every", "replan_method", "bn", "filter_mode", "train_samples", "input_size")


def _refuse_other_settings(path: Path, recorded: dict[str, Any], config: dict[str, Any],
                           plans: tuple[Plan, Plan] | None) -> None:
    """Raise a :class:`TrainingError` naming every setting of :data:`RESUME_SETTINGS` the
    checkpoint at ``path`` (its ``recorded`` config) trained with that this run's ``config``
    changes, and, for a static run, ``plans`` (the checkpoint's, this run's) that differ.
    Settings a checkpoint does not record are not compared."""
    differ = [f"{key} {recorded[key]!r} (this run: {config[key]!r})" for key in RESUME_SETTINGS
              if key in recorded and key in config and recorded[key] != config[key]]
    if plans is not None and plans[0].to_dict()["updates"] != plans[1].to_dict()["updates"]:
        differ.append("another plan (other layers, channels or patch sizes)")
    if differ:
        raise TrainingError(f"{path}: the checkpoint was trained with {'; '.join(differ)}; "
                            "resume with the same settings (only lr and epochs may change), "
                            "or start again in another output directory")


def _last(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return ckpt_dir / f"epoch-{found[-1]:04d}.json" if found else None
