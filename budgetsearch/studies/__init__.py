"""Studies: a YAML grid of (data, model, device, budget, method, seed) cells, run resumably and
reported with tables and plots.

``load_spec(path)`` validates a study file (:mod:`.validate`, into :mod:`.spec`'s types);
``run_study(spec, workers=...)`` makes every pending cell's plan, trains it and records predicted
costs, measured costs and accuracy (:mod:`.runner`, :mod:`.adapters`, records and claims in
:mod:`~budgetsearch.store`); ``write_report(spec)`` writes ``results.csv``, ``report.md`` and the
plots (:mod:`.report`, :mod:`.plots`). The command line is ``budgetsearch study run|report
SPEC.yaml``.

Several workers share a study through atomic claims (:mod:`~budgetsearch.store`): ``--workers N``
processes on one machine; on several machines, either the same results directory on a shared file
system (``--results /shared/dir``, claim files) or the same database URL as the search (``--storage
postgresql://...``: claims and records in a table beside the Optuna studies, whose search cells then
also live in that database); ``study report --storage URL`` gathers the records.
"""

from __future__ import annotations

from ..store import FileStore, SqlStore, open_store
from .adapters import cell_plan, layer_fractions, run_cell, runner_recipe
from .context import CellContext
from .report import COLUMNS, load_rows, write_report
from .runner import RunSummary, cell_status, run_study
from .spec import (
    EXTRA_METHODS,
    Budget,
    Cell,
    DataSpec,
    DeviceSpec,
    MethodEntry,
    ModelSpec,
    StudyError,
    StudySpec,
)
from .validate import load_spec, spec_from_dict

__all__ = [
    "COLUMNS",
    "EXTRA_METHODS",
    "Budget",
    "Cell",
    "CellContext",
    "DataSpec",
    "DeviceSpec",
    "FileStore",
    "MethodEntry",
    "ModelSpec",
    "RunSummary",
    "SqlStore",
    "StudyError",
    "StudySpec",
    "cell_plan",
    "cell_status",
    "layer_fractions",
    "load_rows",
    "load_spec",
    "open_store",
    "run_cell",
    "run_study",
    "runner_recipe",
    "spec_from_dict",
    "write_report",
]
