"""PyTorch Lightning support: :class:`PlanCallback` applies a plan for the length of a fit.

Lightning is optional and imported only by this module (``lightning.pytorch`` or
``pytorch_lightning``, whichever is installed). Usage::

    callback = PlanCallback(plan)                     # or PlanCallback(plan, submodule="model")
    trainer = lightning.Trainer(callbacks=[callback], ...)
    trainer.fit(module, loader)

The plan is applied in ``setup`` (stage ``fit``), before Lightning calls ``configure_optimizers``,
so an optimizer over ``[p for p in self.parameters() if p.requires_grad]`` (or over
``callback.param_groups()``) gets exactly the plan's parameters. It is removed, with the trained
weights merged back, at the end of the fit, in ``teardown`` and on an exception.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import PlanError
from ..fingerprint import fingerprint, layer_shapes
from ..plan import Plan
from .apply import PlanHandle, apply_plan

__all__ = ["PlanCallback"]


def _import_lightning() -> Any:
    try:
        import lightning.pytorch as pl
    except ImportError:
        try:
            import pytorch_lightning as pl
        except ImportError as exc:
            raise ImportError(
                "budgetsearch.trainer.lightning needs PyTorch Lightning: "
                "pip install lightning (or pip install pytorch-lightning)"
            ) from exc
    return pl


_pl = _import_lightning()


class PlanCallback(_pl.Callback):
    """Apply a plan to a LightningModule (or one of its submodules) during ``fit``.

    Args:
        plan: The plan.
        submodule: Qualified name of the submodule the plan was made for (e.g. ``"model"``);
            None finds it: the LightningModule itself, else the first submodule whose layers
            match the plan's fingerprint.
        bn: ``"frozen"`` or ``"train"``, as in :func:`~budgetsearch.trainer.apply_plan`.
        filter_mode: Gradient-filter variant; the plan's by default.
    """

    def __init__(
        self,
        plan: Plan,
        *,
        submodule: str | None = None,
        bn: str = "frozen",
        filter_mode: str | None = None,
    ) -> None:
        super().__init__()
        self.plan, self.submodule = plan, submodule
        self.bn, self.filter_mode = bn, filter_mode
        self.handle: PlanHandle | None = None

    def target(self, pl_module: nn.Module) -> nn.Module:
        """The module the plan applies to.

        Raises:
            PlanError: If ``submodule`` is missing, or no submodule matches the plan.
        """
        if self.submodule is not None:
            try:
                return pl_module.get_submodule(self.submodule)
            except AttributeError as exc:
                raise PlanError(f"the LightningModule has no submodule {self.submodule!r}") from exc
        for _name, module in pl_module.named_modules():
            if fingerprint(layer_shapes(module)) == self.plan.fingerprint:
                return module
        raise PlanError(
            f"no submodule of the LightningModule matches the plan's model "
            f"({self.plan.model or 'unnamed'}, fingerprint {self.plan.fingerprint}); pass "
            "submodule= with the name of the model inside it"
        )

    def param_groups(self) -> list[dict[str, Any]]:
        """The plan's parameter groups (empty before ``setup``)."""
        return self.handle.param_groups() if self.handle is not None else []

    def _apply(self, pl_module: nn.Module) -> None:
        if self.handle is None or not self.handle.active:
            self.handle = apply_plan(self.target(pl_module), self.plan, bn=self.bn,
                                     filter_mode=self.filter_mode)

    def _remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._apply(pl_module)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._apply(pl_module)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._remove()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._remove()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._remove()
