"""The examples in the docstrings of the library's entry points run and print what they show."""

from __future__ import annotations

import doctest
import io

import pytest
import torch

from budgetsearch import CostModel, apply_plan, plan_for, select
from budgetsearch.search import Search

torch.set_num_threads(1)

#: The objects whose docstring must hold a runnable example.
DOCUMENTED = {"CostModel": CostModel, "select": select, "Search": Search, "apply_plan": apply_plan,
              "plan_for": plan_for}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_docstring_example_runs(name: str) -> None:
    obj = DOCUMENTED[name]
    # the object's own docstring only (not its methods'), in a namespace of its own: the example
    # imports what it uses
    found = doctest.DocTestFinder(recurse=False).find(obj, name, globs={})
    examples = [t for t in found if t.examples]
    assert examples, f"{name}'s docstring has no example"
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in examples:
        runner.run(test, out=report.write)
    results = runner.summarize(verbose=False)
    assert results.attempted >= 3
    assert results.failed == 0, report.getvalue()
