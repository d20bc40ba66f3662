"""The training cost model: per-op rules, accountings, the memory timeline, latency, results."""

from __future__ import annotations

from .model import ACCOUNTINGS, MEMORY_MEASURES, CostModel, accounting_for
from .result import Cost, CostSummary, CostTotals, LayerRow, OpRow
from .rules import RULES, Accounting, OpContext, OpCost, Rule, register_rule, unknown_rule

__all__ = [
    "ACCOUNTINGS",
    "MEMORY_MEASURES",
    "RULES",
    "Accounting",
    "Cost",
    "CostModel",
    "CostSummary",
    "CostTotals",
    "LayerRow",
    "OpContext",
    "OpCost",
    "OpRow",
    "Rule",
    "accounting_for",
    "register_rule",
    "unknown_rule",
]
