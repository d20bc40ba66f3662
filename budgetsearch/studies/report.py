"""The study report: ``results.csv`` (one row per cell), ``report.md`` and PNG plots.

Everything in the report is computed from the cell records; nothing is typed in by hand. Means and
standard deviations are over the seeds of a (data, model, device, budget, method) group (sample
standard deviation; ``±`` omitted for a single seed). Accuracies are shown in percent.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from .._threads import kernel_key
from ..store import open_store
from .spec import StudySpec

__all__ = ["COLUMNS", "average_ranks", "load_rows", "write_report"]

COLUMNS = (
    "cell_id", "status", "data", "model", "device", "budget", "budget_bytes",
    "latency_budget_ms", "method", "method_kind", "role", "seed", "accuracy",
    "final_test_accuracy", "best_val_accuracy", "protocol", "memory_bytes", "pred_peak_bytes",
    "pred_training_bytes",
    "pred_saved_bytes", "pred_forward_macs", "pred_backward_macs", "pred_latency_ms",
    "trainable_params", "pred_ops_saved_bytes", "measured_saved_bytes", "measured_backward_ms",
    "train_seconds", "mit_memory_bytes", "fits", "updated_layers", "patch_sizes", "proxy",
    "seconds", "error_type", "error", "lr", "pred_latency_model", "threads", "kernels",
)
_GROUP = ("data", "model", "device")


def _row(rec: dict[str, Any]) -> dict[str, Any]:
    pred, ops = rec.get("predicted") or {}, rec.get("predicted_ops") or {}
    metrics, err = rec.get("metrics") or {}, rec.get("error") or {}
    row = {**rec.get("key", {}), "cell_id": rec.get("cell_id"), "status": rec.get("status"),
           "budget_bytes": rec.get("budget_bytes"),
           "latency_budget_ms": rec.get("latency_budget_ms"),
           "method_kind": rec.get("method_kind"), "role": rec.get("role"),
           "memory_bytes": rec.get("memory_bytes"),
           "pred_peak_bytes": pred.get("peak_memory_bytes"),
           "pred_training_bytes": pred.get("training_memory_bytes"),
           "pred_saved_bytes": pred.get("saved_activation_bytes"),
           "pred_forward_macs": pred.get("forward_macs"),
           "pred_backward_macs": pred.get("backward_macs"),
           "pred_latency_ms": pred.get("latency_ms"),
           # records made before latency models were named were all analytic
           "pred_latency_model": pred.get("latency_model") or (
               "analytic" if pred.get("latency_ms") is not None else None),
           "trainable_params": pred.get("trainable_params"),
           "pred_ops_saved_bytes": ops.get("saved_activation_bytes"),
           "mit_memory_bytes": rec.get("mit_memory_bytes"), "fits": rec.get("fits"),
           "updated_layers": rec.get("updated_layers"),
           "patch_sizes": " ".join(map(str, rec.get("patch_sizes") or [])) or None,
           "proxy": rec.get("proxy"), "seconds": rec.get("seconds"), "lr": rec.get("lr"),
           "error_type": err.get("type"), "error": err.get("message")}
    row.update({k: metrics.get(k) for k in ("measured_saved_bytes", "measured_backward_ms",
                                            "train_seconds")})
    row.update(_accuracies(metrics))
    row.update(_run_configuration(rec))
    first = _first_epoch(rec)
    if isinstance(first.get("saved_activation_bytes"), (int, float)):
        # the first epoch trains the cell's own plan, the one predicted_ops is for (a dynamic
        # method re-plans after it, and its later epochs measure other plans)
        row["measured_saved_bytes"] = first["saved_activation_bytes"]
    return row


def _accuracies(metrics: dict[str, Any]) -> dict[str, Any]:
    """The reported accuracies of a record: ``accuracy`` is the test accuracy at the epoch of
    best validation accuracy (validation carved out of the training data). A record of the
    legacy protocol validated on the test split, so the epoch it would pick was chosen on test:
    its ``accuracy`` is the final test accuracy instead, and it has no separate validation."""
    if metrics.get("test_accuracy") is not None:
        return {"accuracy": metrics["test_accuracy"],
                "final_test_accuracy": metrics.get("final_test_accuracy"),
                "best_val_accuracy": metrics.get("best_accuracy"), "protocol": "carved"}
    final = metrics.get("final_accuracy")
    return {"accuracy": final, "final_test_accuracy": final, "best_val_accuracy": None,
            "protocol": "legacy" if final is not None else None}


def _run_configuration(rec: dict[str, Any]) -> dict[str, Any]:
    """The torch thread count(s) and CPU kernels a cell's runs trained with, as its record
    says (every rate's run of a tuned cell; the run of an untuned one), joined by ``;`` when
    they differ; None where the record does not say (made before they were kept)."""
    raw = rec.get("metrics_raw") or {}
    runs = list((raw.get("tuning") or {}).values()) or [raw]
    found = {}
    for key in ("threads", "kernels"):
        values = {int(part) if part.isdigit() else part
                  for r in runs if isinstance(r, dict) and r.get(key) is not None
                  for part in str(r[key]).split(";")}  # a resumed run may name several
        found[key] = ";".join(map(str, sorted(values, key=lambda v: (str(type(v)), v)))) or None
    return found


def _configurations(rows: Sequence[dict[str, Any]]) -> list[str]:
    """How the runs were computed (threads, kernels), and every budget whose methods were
    trained on more than one: a run repeats bit for bit only on the same thread count and
    kernels, so such a budget compares methods across configurations as well as plans."""
    done = [r for r in rows if r["status"] == "done"]
    if not any(r.get("threads") or r.get("kernels") for r in done):
        return []

    def config(r: dict[str, Any]) -> str:
        if not (r.get("threads") or r.get("kernels")):
            return "not recorded"
        # the same kernels recorded with and without the CPU's flags are one configuration
        kernels = (";".join(sorted({kernel_key(k) for k in r["kernels"].split(";")}))
                   if r.get("kernels") else "kernels ?")
        return f"{r.get('threads') or '?'} thread(s), {kernels}"

    counts = Counter(config(r) for r in done)
    out = ["## Training configurations", "",
           "Cells by the torch thread count and CPU kernels their runs recorded "
           "(`threads`, `kernels` in results.csv; a run repeats bit for bit only on the same "
           "of both, `benchmarks/rerun_cells.py`; the CPU's flags, `cpu=`, are shown only "
           "where they decide oneDNN's kernels, `budgetsearch._threads.kernel_key`):", "",
           *_table(("configuration", "cells"), sorted(counts.items())), ""]
    mixed = []
    for key, group in _groups(done, (*_GROUP, "budget")).items():
        known = {config(r) for r in group} - {"not recorded"}
        if len(known) > 1:
            mixed.append((" · ".join(map(str, key)), "; ".join(sorted(known))))
    if mixed:
        out += ["Budgets whose methods were trained on more than one configuration (their "
                "head-to-head compares configurations as well as plans):", "",
                *_table(("data · model · device · budget", "configurations"), mixed), ""]
    return out


def _first_epoch(rec: dict[str, Any]) -> dict[str, Any]:
    epochs = (rec.get("metrics_raw") or {}).get("epochs") or []
    return epochs[0] if epochs and isinstance(epochs[0], dict) else {}


def load_rows(spec: StudySpec, *, storage: str | None = None) -> list[dict[str, Any]]:
    """One row per cell of the spec, in the spec's cell order: ``status`` ``pending`` where no
    record exists and ``outdated`` where the record was made for another configuration of the
    cell (the study file changed since; ``study run`` runs it again): neither has results."""
    records = open_store(spec.cells_dir, storage=storage, study=spec.name).records()
    rows = []
    for cell in spec.cells():
        rec = records.get(cell.id)
        if rec is None or rec.get("config_hash") != cell.config_hash():
            rows.append({**cell.key(), "cell_id": cell.id,
                         "status": "pending" if rec is None else "outdated",
                         "method_kind": cell.method.method, "role": cell.method.role,
                         "budget_bytes": cell.budget.memory_bytes})
        else:
            rows.append(_row(rec))
    return rows


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """``results.csv``: the :data:`COLUMNS` of every row, written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return _write_text(path, buf.getvalue())


def _write_text(path: Path, text: str) -> Path:
    return atomic_write_text(path, text)


# ------------------------------------------------------------------------------ statistics
def _values(rows: Iterable[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if isinstance(r.get(key), (int, float))
            and not isinstance(r.get(key), bool) and math.isfinite(float(r[key]))]


def _mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _pct(v: float) -> float:
    return v * 100.0 if abs(v) <= 1.0 else v


def _fmt(values: Sequence[float], scale: float = 1.0, digits: int = 1, pct: bool = False) -> str:
    ms = _mean_std([_pct(v) if pct else v / scale for v in values])
    if ms is None:
        return "–"
    mean, std = ms
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(values) > 1 else "")


def _groups(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return out


def _table(header: Sequence[str], lines: Iterable[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(x) for x in line) + " |" for line in lines]
    return out


# ---------------------------------------------------------------------------------- sections
def _results_tables(rows: Sequence[dict[str, Any]]) -> list[str]:
    out = ["## Results (mean ± std over seeds)", "",
           "*Test acc* is the test accuracy at the epoch of best validation accuracy, the "
           "validation split carved out of the training data; records of the legacy protocol "
           "(validated on the test split: no *best val acc*) show their final test accuracy "
           "there instead, since their best epoch was chosen on test. "
           "Memory is the study's budgeted measure as predicted by the cost model; *measured "
           "saved* is what autograd kept in training (host, training batch size), beside the "
           "`ops`-accounting prediction of the same figure.", ""]
    header = ("budget", "method", "seeds ok/all", "test acc %", "final test acc %",
              "best val acc %", "memory KB",
              "measured saved KB", "predicted saved KB (ops)", "backward MMACs",
              "train time s", "lr chosen")
    for key, group in _groups(rows, _GROUP).items():
        out += [f"### {' · '.join(map(str, key))}", ""]
        lines = []
        for (budget, method), g in _groups(group, ("budget", "method")).items():
            done = [r for r in g if r["status"] == "done"]
            lines.append((budget, method, f"{len(done)}/{len(g)}",
                          _fmt(_values(done, "accuracy"), pct=True),
                          _fmt(_values(done, "final_test_accuracy"), pct=True),
                          _fmt(_values(done, "best_val_accuracy"), pct=True),
                          _fmt(_values(done, "memory_bytes"), 1024),
                          _fmt(_values(done, "measured_saved_bytes"), 1024),
                          _fmt(_values(done, "pred_ops_saved_bytes"), 1024),
                          _fmt(_values(done, "pred_backward_macs"), 1e6, 3),
                          _fmt(_values(done, "train_seconds"), 1, 1),
                          " ".join(f"{v:g}" for v in sorted(set(_values(done, "lr")))) or "–"))
        out += [*_table(header, lines), ""]
    return out


def _honest(rows: Sequence[dict[str, Any]]) -> list[str]:
    out = ["## Honest comparison: the search against the best published selector", "",
           "For every budget: the search's plan against the most accurate published selector "
           "whose predicted memory is at most the search plan's (means over seeds of the test "
           "accuracy; ± is the standard error of the difference). *Within noise* when the "
           "difference is smaller than that error.", ""]
    lines = []
    done = [r for r in rows if r["status"] == "done"]
    for key, group in _groups(done, (*_GROUP, "budget")).items():
        by_method = _groups(group, ("method",))
        searches = [m for (m,), g in by_method.items() if g[0].get("role") == "search"]
        published = [m for (m,), g in by_method.items() if g[0].get("role") == "published"]
        for s in searches:
            acc_s, mem_s = (_values(by_method[(s,)], "accuracy"),
                            _values(by_method[(s,)], "memory_bytes"))
            if not acc_s or not mem_s:
                continue
            fitting = [(statistics.fmean(a), p, a) for p in published
                       if (a := _values(by_method[(p,)], "accuracy"))
                       and (mp := _values(by_method[(p,)], "memory_bytes"))
                       and statistics.fmean(mp) <= statistics.fmean(mem_s)]
            where = " · ".join(map(str, key))
            if not fitting:
                lines.append((where, s, _fmt(acc_s, pct=True), "none at ≤ memory", "–", "–",
                              "no comparison"))
                continue
            mean_p, best, acc_p = max(fitting)
            delta = _pct(statistics.fmean(acc_s)) - _pct(mean_p)
            err = math.sqrt(sum(statistics.variance([_pct(v) for v in a]) / len(a)
                                for a in (acc_s, acc_p) if len(a) > 1))
            verdict = "yes" if delta >= 0 else "no"
            if abs(delta) < err:
                verdict += " (within noise)"
            lines.append((where, s, _fmt(acc_s, pct=True), best, _fmt(acc_p, pct=True),
                          f"{delta:+.2f}" + (f" ± {err:.2f}" if err else ""), verdict))
    if not lines:
        return [*out, "No budget has both a finished search cell and a finished published "
                "selector cell yet, so there is no comparison to make.", ""]
    header = ("data · model · device · budget", "search", "search acc %",
              "best published at ≤ memory", "its acc %", "Δ points", "search ≥ published?")
    return [*out, *_table(header, lines), ""]


def _head_to_head(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every search-role method against the best baseline of its budget (any ``published`` or
    ``baseline`` method, whatever its memory: the strictest comparison), with both memories."""
    done = [r for r in rows if r["status"] == "done"]
    lines, verdicts = [], {}
    for key, group in _groups(done, (*_GROUP, "budget")).items():
        by_method = _groups(group, ("method",))
        base = [(statistics.fmean(_pct(v) for v in a), m) for (m,), g in by_method.items()
                if g[0].get("role") in ("published", "baseline") and (a := _values(g, "accuracy"))]
        if not base:
            continue
        best_mean, best = max(base)
        for (m,), g in by_method.items():
            acc = _values(g, "accuracy")
            if g[0].get("role") != "search" or not acc:
                continue
            delta = statistics.fmean(_pct(v) for v in acc) - best_mean
            verdict = "ahead ≥ 1" if delta >= 1 else "within 1" if delta >= -1 else "behind"
            verdicts.setdefault(m, []).append(verdict)
            lines.append((" · ".join(map(str, key)), m, _fmt(acc, pct=True),
                          _fmt(_values(g, "memory_bytes"), 1024), best,
                          _fmt(_values(by_method[(best,)], "accuracy"), pct=True),
                          _fmt(_values(by_method[(best,)], "memory_bytes"), 1024),
                          f"{delta:+.1f}", verdict))
    if not lines:
        return []
    out = ["## Head-to-head: each search method against the best baseline of its budget", "",
           "The best baseline is the method (role `published` or `baseline`) with the highest "
           "mean test accuracy at the budget, whatever memory it uses; Δ is the search's mean "
           "minus it, in points. Memory is the budgeted measure, predicted.", ""]
    for m, v in verdicts.items():
        n, ok, ahead = len(v), sum(x != "behind" for x in v), v.count("ahead ≥ 1")
        out.append(f"- `{m}`: at least the best baseline minus 1 point in {ok} of {n} budgets "
                   f"({100 * ok / n:.0f} %), ahead by at least 1 point in {ahead} of {n}.")
    header = ("data · model · device · budget", "search", "acc %", "memory KB", "best baseline",
              "its acc %", "its memory KB", "Δ points", "verdict")
    return [*out, "", *_table(header, lines), ""]


def _vs_full(rows: Sequence[dict[str, Any]]) -> list[str]:
    out = ["## Distance to full fine-tuning", "",
           "Accuracy gap to the `reference` method (full fine-tuning, over budget) and the "
           "fraction of its predicted memory (the budgeted measure), saved activations and "
           "backward MACs each method uses.", ""]
    lines = []
    done = [r for r in rows if r["status"] == "done"]
    for key, group in _groups(done, _GROUP).items():
        ref = [r for r in group if r.get("role") == "reference"]
        acc_f, mem_f, mac_f, sav_f = (
            _values(ref, "accuracy"), _values(ref, "memory_bytes"),
            _values(ref, "pred_backward_macs"), _values(ref, "pred_saved_bytes"))
        if not acc_f:
            continue
        for (budget, method), g in _groups(group, ("budget", "method")).items():
            if g[0].get("role") == "reference":
                continue
            acc, mem, mac, sav = (_values(g, "accuracy"), _values(g, "memory_bytes"),
                                  _values(g, "pred_backward_macs"), _values(g, "pred_saved_bytes"))
            gap = (f"{_pct(statistics.fmean(acc)) - _pct(statistics.fmean(acc_f)):+.2f}"
                   if acc else "–")
            lines.append((" · ".join(map(str, key)), budget, method, gap, _frac(mem, mem_f),
                          _frac(sav, sav_f), _frac(mac, mac_f)))
    if not lines:
        return [*out, "No finished full fine-tuning cell to compare with.", ""]
    return [*out, *_table(("data · model · device", "budget", "method", "Δ acc points",
                           "memory / full", "saved activations / full", "backward MACs / full"),
                          lines), ""]


def _frac(a: Sequence[float], b: Sequence[float]) -> str:
    if not a or not b or not statistics.fmean(b):
        return "–"
    return f"{statistics.fmean(a) / statistics.fmean(b):.3f}"


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 0..n-1, ties given their mean rank (Pearson's correlation of two such rank lists
    is Spearman's ρ)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _proxy_check(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Whether the search's accuracy proxy ranks the cells of a budget as their accuracy does."""
    groups: dict[tuple, list[tuple[float, float]]] = {}
    for r in rows:
        if (r["status"] == "done" and r.get("role") != "reference"
                and isinstance(r.get("proxy"), (int, float))
                and isinstance(r.get("accuracy"), (int, float))):
            key = (*(r[k] for k in _GROUP), r["budget"])
            groups.setdefault(key, []).append((float(r["proxy"]), float(r["accuracy"])))
    table = []
    for key, pairs in groups.items():
        proxy, acc = average_ranks([p for p, _ in pairs]), average_ranks([a for _, a in pairs])
        if len(pairs) < 4 or len(set(proxy)) < 2 or len(set(acc)) < 2:
            continue
        table.append((" · ".join(map(str, key)), len(pairs),
                      statistics.correlation(proxy, acc)))
    if not table:
        return []
    rhos = [rho for _, _, rho in table]
    return ["## Does the search's proxy predict accuracy?", "",
            "Spearman rank correlation, within each budget, between a cell's accuracy proxy "
            "(captured Fisher potential, the search's first objective) and its test accuracy, "
            f"over every method but the reference: {len(table)} budgets, median "
            f"{statistics.median(rhos):+.3f}, range {min(rhos):+.3f} to {max(rhos):+.3f}. A "
            "search can only beat the selectors in accuracy where this is clearly positive.", "",
            *_table(("data · model · device · budget", "cells", "Spearman"),
                    [(k, n, f"{rho:+.3f}") for k, n, rho in table]), ""]


def _predictions(rows: Sequence[dict[str, Any]]) -> list[str]:
    import numpy as np

    out = ["## Predicted against measured, cell by cell", ""]
    pairs = [(r["cell_id"], r["pred_ops_saved_bytes"], r["measured_saved_bytes"]) for r in rows
             if r["status"] == "done" and isinstance(r.get("pred_ops_saved_bytes"), (int, float))
             and isinstance(r.get("measured_saved_bytes"), (int, float))]
    if pairs:
        ratios = [m / p if p else math.inf for _, p, m in pairs]
        exact = sum(1 for x in ratios if abs(x - 1) <= 0.01)
        out += [f"Saved activations, measured / predicted (`ops` accounting at the training "
                f"batch size): {len(pairs)} cells, median {statistics.median(ratios):.3f}, "
                f"range {min(ratios):.3f}–{max(ratios):.3f}; {exact} within 1 %.", ""]
        off = [(c, p, m, x) for (c, p, m), x in zip(pairs, ratios, strict=True)
               if abs(x - 1) > 0.05]
        if off:
            out += [*_table(("cell", "predicted KB", "measured KB", "ratio"),
                            [(c, f"{p / 1024:.1f}", f"{m / 1024:.1f}", f"{x:.3f}")
                             for c, p, m, x in off[:40]]), ""]
    else:
        out += ["No cell has both a predicted and a measured saved-activation figure.", ""]
    t = [(r["pred_backward_macs"], r["measured_backward_ms"]) for r in rows
         if r["status"] == "done" and isinstance(r.get("pred_backward_macs"), (int, float))
         and isinstance(r.get("measured_backward_ms"), (int, float))]
    if len(t) >= 3:
        macs, ms = np.array(t, dtype=float).T
        corr = float(np.corrcoef(macs, ms)[0, 1]) if macs.std() and ms.std() else float("nan")
        out += [f"Backward time: the cost model predicts the device's latency, not this host's, "
                f"so the check is the ordering: Pearson r between predicted backward MACs and "
                f"measured host backward ms over {len(t)} cells = {corr:.3f}.", ""]
    models = sorted({str(r["pred_latency_model"]) for r in rows
                     if r.get("pred_latency_model") and r["status"] == "done"})
    if models:
        out += ["Predicted step times (`pred_latency_ms`) come from: "
                + "; ".join(models) + ".", ""]
    return out


def _failures(rows: Sequence[dict[str, Any]]) -> list[str]:
    failed = [r for r in rows if r["status"] == "failed"]
    if not failed:
        return []
    lines = [(r["cell_id"], r.get("error_type"), str(r.get("error") or "")[:200]
              .replace("|", "/")) for r in failed]
    return ["## Failed cells", "", *_table(("cell", "error", "reason"), lines), ""]


def write_report(spec: StudySpec, *, storage: str | None = None, command: str | None = None,
                 plots: bool = True) -> dict[str, Path]:
    """Write ``results.csv``, ``report.md`` and the plots into the study's results directory.

    Args:
        spec: The study.
        storage: The database URL the records are in, if not the results directory.
        command: The report command line, quoted in the report's header.
        plots: Also draw the PNG plots.

    Returns:
        The written files by kind (``csv``, ``md``, and one entry per plot).
    """
    import json

    from .plots import draw_plots
    from .published import published_section

    rows = load_rows(spec, storage=storage)
    out_dir = spec.results_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"csv": write_csv(rows, out_dir / "results.csv")}
    pngs = draw_plots(spec, rows, out_dir) if plots else {}
    files.update(pngs)
    try:
        runs = json.loads((out_dir / "runs.json").read_text())
    except (OSError, ValueError):
        runs = []
    spec_path = spec.path.as_posix() if spec.path else "SPEC.yaml"
    counts = {s: sum(1 for r in rows if r["status"] == s)
              for s in ("done", "failed", "pending", "outdated")}
    md = [f"# Study `{spec.name}`", "",
          f"Generated by `{command or f'budgetsearch study report {spec_path}'}` from "
          f"`{spec_path}`; cells made by "
          + (", ".join(f"`{c}`" for c in dict.fromkeys(r.get("command") for r in runs
                                                        if r.get("command")))
             or f"`budgetsearch study run {spec_path}`") + ".", ""]
    if spec.description:
        md += [spec.description.strip(), ""]
    d = spec.training
    lr = (f"lr chosen on validation per cell from {{{', '.join(f'{x:g}' for x in d['lrs'])}}}"
          if d.get("lrs") else f"lr {d['lr']}")
    engine = (" on the planner's PlanRunner (frozen prefix cached; scored after the last epoch)"
              if d.get("engine") == "runner" else "")
    md += [f"{len(rows)} cells: {counts['done']} done, {counts['failed']} failed, "
           f"{counts['pending']} pending"
           + (f", {counts['outdated']} outdated (made for another configuration of the cell; "
              "left out)" if counts["outdated"] else "")
           + f". Input {spec.input_size} px; training {d['epochs']} epoch(s){engine}, batch "
           f"{d['batch_size']}, {lr}, {d['optimizer']}; cost model "
           f"{spec.cost['accounting']} accounting, budgets on {spec.cost['memory_measure']} "
           f"memory; seeds {', '.join(map(str, spec.seeds))}."
           + "".join(f" Method {m.name}: lr {m.lr:g}." for m in spec.methods if m.lr), ""]
    md += ["Data: " + "; ".join(
        f"{x.name} = {x.source} {x.train_split} {x.train_size or 'all'}"
        + (f" ({x.per_class}/class)" if x.per_class else "")
        + (f" / validation {x.val_split} {x.val_size or 'all'} (legacy: the test split "
           "chose the epoch)" if x.legacy else
           f", {(x.val_fraction or 0.2) * 100:g} % of it held out for validation / test "
           f"{x.test_split or 'test'} {x.test_size or 'all'}") + f" (seed {x.seed}"
        + (f", {x.epochs} epochs" if x.epochs else "") + ")" for x in spec.data), ""]
    md += (_results_tables(rows) + _head_to_head(rows) + _honest(rows) + _proxy_check(rows)
           + _vs_full(rows)
           + _predictions(rows) + _configurations(rows))
    md += published_section([m.name for m in spec.models]) + _failures(rows)
    if pngs:
        md += ["## Plots", ""] + [f"![{k}]({p.name})" for k, p in pngs.items()] + [""]
    files["md"] = _write_text(out_dir / "report.md", "\n".join(md))
    return files
