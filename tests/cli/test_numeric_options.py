"""Numeric options of every command: zero, negative, non-finite and absurd values are refused by
argument parsing with one line naming the option and its range (exit status 2, no traceback),
before any model is loaded; values in range are accepted."""

from __future__ import annotations

import contextlib
import io
import math
import subprocess
import sys
from dataclasses import dataclass

import pytest
from _toys import conv_pool_linear
from hypothesis import given, settings
from hypothesis import strategies as st

from budgetsearch.cli import build_parser, main
from budgetsearch.cli._common import check_update, parse_update
from budgetsearch.cost import CostModel
from budgetsearch.errors import BudgetSearchError, CostError, GraphError, PlanError
from budgetsearch.graph import LayerGraph
from budgetsearch.profiles import load_profile
from budgetsearch.units import parse_bytes, parse_ms

# The required arguments of each command; the names need not exist: parsing fails first.
BASE = {
    "plan": ["plan", "--model", "mobilenet_v2", "--device", "stm32h743", "--out", "p.json"],
    "front": ["front", "--storage", "sqlite:///s.db", "--study", "s", "--out", "front"],
    "worker": ["worker", "--storage", "sqlite:///s.db", "--study", "s"],
    "cost": ["cost", "--model", "mobilenet_v2", "--device", "stm32h743"],
    "select": ["select", "--method", "last-k", "--model", "mobilenet_v2", "--device",
               "stm32h743", "--out", "p.json"],
    "score": ["score", "--model", "mobilenet_v2", "--criterion", "magnitude", "--out", "s.npz"],
    "train": ["train", "--model", "mobilenet_v2", "--plan", "p.json", "--data", "cifar10",
              "--out", "run", "--epochs", "1"],
    "study run": ["study", "run", "study.yaml"],
    "profile-host": ["profile-host", "--out", "host.yaml"],
}


@dataclass(frozen=True)
class Opt:
    """A numeric option: its command, flag, argparse dest and accepted range."""

    command: str
    flag: str
    low: float
    high: float
    kind: str = "int"  # int | float
    low_open: bool = False
    high_open: bool = False

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    def accepts(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        return f"{self.command} {self.flag}"


MODEL_CMDS = ("plan", "cost", "select", "score", "train")
OPTS = [
    *(Opt(c, "--num-classes", 1, 100_000) for c in MODEL_CMDS),
    *(Opt(c, "--input-size", 1, 4096) for c in MODEL_CMDS),
    *(Opt(c, "--batch-size", 1, 65536) for c in ("plan", "cost", "select", "train")),
    Opt("plan", "--samples", 1, 10_000_000),
    Opt("plan", "--micro-batch", 1, 65536),
    Opt("plan", "--trials", 1, 1_000_000),
    Opt("plan", "--last-n", 1, 100_000),
    Opt("plan", "--population", 2, 100_000),
    Opt("plan", "--seed", 0, 2**32 - 1),
    Opt("plan", "--alpha", 0, 100, "float", low_open=True),
    Opt("plan", "--bias-credit", 0, 1, "float"),
    *(Opt(c, "--flush-seconds", 0, 86400, "float") for c in ("plan", "front", "worker")),
    Opt("worker", "--trials", 1, 1_000_000),
    Opt("worker", "--seed", 0, 2**32 - 1),
    Opt("score", "--samples", 1, 10_000_000),
    Opt("score", "--micro-batch", 1, 65536),
    Opt("score", "--per-class", 1, 10_000_000),
    Opt("score", "--seed", 0, 2**32 - 1),
    Opt("select", "--seed", 0, 2**32 - 1),
    Opt("select", "--k", 0, 100_000),
    Opt("select", "--patch-size", 1, 4096),
    Opt("select", "--budget-params", 0, 10**12),
    Opt("select", "--n-bias", 0, 100_000),
    Opt("train", "--epochs", 1, 100_000),
    Opt("train", "--lr", 0, 10, "float", low_open=True),
    Opt("train", "--momentum", 0, 1, "float", high_open=True),
    Opt("train", "--weight-decay", 0, 1, "float"),
    Opt("train", "--every", 1, 100_000),
    Opt("train", "--search-trials", 1, 1_000_000),
    Opt("train", "--train-samples", 1, 10_000_000),
    Opt("train", "--val-samples", 1, 10_000_000),
    Opt("train", "--seed", 0, 2**32 - 1),
    Opt("train", "--threads", 1, 1024),
    Opt("study run", "--workers", 1, 256),
    Opt("study run", "--stale-after", 0, 7 * 86400, "float", low_open=True),
    Opt("profile-host", "--repeats", 1, 10_000),
]


def bad_values(opt: Opt) -> list[str]:
    """Zero or below the range, above it, non-finite, huge and malformed values."""
    if opt.kind == "int":
        values = [str(int(opt.low) - 1), str(int(opt.high) + 1), "-5", str(10**30), "1e9",
                  "2.5", "nan", "abc", ""]
        if opt.low >= 1:
            values.append("0")
    else:
        values = [str(opt.high * 10 + 1), "-5", "1e400", "nan", "inf", "-inf", "abc", ""]
        values += [f"{opt.low:g}"] if opt.low_open else ["-0.001"]
        values += [f"{opt.high:g}"] if opt.high_open else []
    return list(dict.fromkeys(values))


BAD = [pytest.param(opt, value, id=f"{opt}={value}") for opt in OPTS
       for value in bad_values(opt)]


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` in-process: the exit status and stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors exit from parse_args
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def assert_named_error(err: str, command: str, flag: str, value: str) -> None:
    """stderr ends in ``budgetsearch CMD: error: argument FLAG: must be ..., got VALUE``."""
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"budgetsearch {command}: error: argument {flag}: must be "), err
    assert ("from " in last and " to " in last) or " in [" in last or " in (" in last, last
    assert value.strip() in last


@pytest.mark.parametrize(("opt", "value"), BAD)
def test_bad_numeric_value_is_a_named_error(capsys, opt, value):
    code, err = run(capsys, [*BASE[opt.command], f"{opt.flag}={value}"])
    assert code == 2
    assert_named_error(err, opt.command, opt.flag, value)


@pytest.mark.parametrize("opt", OPTS, ids=str)
def test_the_ends_of_each_range_are_accepted(opt):
    parser = build_parser()
    ends = [opt.low, opt.high]
    if opt.low_open:
        ends[0] = opt.low + 1e-6
    if opt.high_open:
        ends[1] = opt.high - 1e-6
    for end in ends:
        text = str(int(end)) if opt.kind == "int" else repr(float(end))
        args = parser.parse_args([*BASE[opt.command], f"{opt.flag}={text}"])
        assert getattr(args, opt.dest) == (int(end) if opt.kind == "int" else float(text))


def test_cost_negative_input_size_is_a_named_error(capsys):
    code, err = run(capsys, ["cost", "--model", "mobilenet_v2", "--device", "stm32h743",
                             "--input-size", "-5"])
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "budgetsearch cost: error: argument --input-size: must be a positive integer from 1 "
        "to 4,096 pixels, got -5")


def test_cost_negative_input_size_from_the_shell():
    done = subprocess.run(
        [sys.executable, "-m", "budgetsearch", "cost", "--model", "mobilenet_v2", "--device",
         "stm32h743", "--input-size", "-5"],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "argument --input-size: must be a positive integer" in done.stderr


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [
        (cmd, flag, value)
        for cmd in ("plan", "select")
        for flag, values in (("--budget", ["0", "0KB", "0.5", "-1KB", "1e30GB", "2048GB", "inf",
                                           "nan", "12 parsecs"]),
                             ("--latency-budget", ["0", "0ms", "0s", "-5ms", "2h", "1e9s",
                                                   "nan", "inf"]))
        for value in values
    ] + [("train", "--budget", v) for v in ("0", "-1KB", "1e30GB")],
)
def test_bad_budget_is_a_named_error(capsys, command, flag, value):
    code, err = run(capsys, [*BASE[command], f"{flag}={value}"])
    assert code == 2
    assert_named_error(err, command, flag, value)
    assert "1 TB" in err if flag == "--budget" else "1 hour" in err


@pytest.mark.parametrize(("flag", "value"), [("--budget", "-5MB"), ("--budget", "-1"),
                                             ("--latency-budget", "-5ms")])
def test_a_negative_budget_as_its_own_word_gets_the_range_message(capsys, flag, value):
    """``--budget -5MB`` (a separate word) is no option: argparse said "expected one
    argument"; it gets the same message as ``--budget=-5MB``."""
    code, err = run(capsys, [*BASE["select"], flag, value])
    assert code == 2 and "expected one argument" not in err
    assert_named_error(err, "select", flag, value)


def test_budgets_in_range_are_parsed_to_bytes_and_ms():
    args = build_parser().parse_args([*BASE["select"], "--budget", "256KB",
                                      "--latency-budget", "2s"])
    assert (args.budget, args.latency_budget) == (256 * 1024, 2000.0)
    args = build_parser().parse_args([*BASE["plan"], "--budget", "1024GiB"])
    assert args.budget == 1 << 40


@pytest.mark.parametrize(
    "update",
    ["last:0", "last:-1", "last:", "blocks:-1", "blocks:2:r0", "blocks:2:r-3", "last:4:r99999",
     "last:100001", "last:4:x", "last:4:r", "full:3", "bias-only:2", "last:1:2:3", "-1"],
)
def test_bad_update_is_refused_before_the_model_is_loaded(capsys, monkeypatch, update):
    import budgetsearch.cli.cost as cost_cli

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(cost_cli, "build_model", no_model)
    code, err = run(capsys, [*BASE["cost"], f"--update={update}"])
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"budgetsearch cost: error: --update {update!r}: ")


@pytest.mark.parametrize(("text", "expected"),
                         [("full", ("full", None, 1)), ("bias", ("bias-only", None, 1)),
                          ("none", ("none", None, 1)), ("last:4", ("last", 4, 1)),
                          ("blocks:0", ("blocks", 0, 1)), ("blocks:2:r4", ("blocks", 2, 4))])
def test_good_update_forms(text, expected):
    assert check_update(text) == expected


def test_update_k_beyond_the_model_names_the_option():
    graph = LayerGraph.from_model(conv_pool_linear(), input_size=8)
    with pytest.raises(PlanError, match=r"^--update 'last:3': k must be between 1 and 2"):
        parse_update("last:3", graph)
    assert len(parse_update("last:2", graph).updates) == 2


@pytest.mark.parametrize(
    "size", [-5, 0, (8, 0), (-1, 8), (8, 8, 8), 2.5, True, math.nan, math.inf, "8"])
def test_layer_graph_refuses_bad_input_sizes(size):
    with pytest.raises(GraphError, match="input_size must be a positive integer"):
        LayerGraph.from_model(conv_pool_linear(), input_size=size)


def test_layer_graph_refuses_bad_channels():
    with pytest.raises(GraphError, match="in_channels must be a positive integer"):
        LayerGraph.from_model(conv_pool_linear(), input_size=8, in_channels=0)


@pytest.mark.parametrize("batch", [0, -1])
def test_cost_model_refuses_batch_zero(batch):
    graph = LayerGraph.from_model(conv_pool_linear(), input_size=8)
    with pytest.raises(CostError, match="batch size must be >= 1"):
        CostModel(graph, load_profile("stm32h743"), batch_size=batch)


@pytest.mark.parametrize("text", ["0", "0KB", "0.5", 0, 0.4])
def test_parse_bytes_positive_refuses_zero(text):
    with pytest.raises(BudgetSearchError, match=r"^--budget: must be at least 1 byte"):
        parse_bytes(text, what="--budget", positive=True)
    assert parse_bytes(text) == 0  # sizes in general may be zero


@pytest.mark.parametrize("text", ["0", "0ms", "0s", 0, 0.0])
def test_parse_ms_positive_refuses_zero(text):
    with pytest.raises(BudgetSearchError, match=r"^--latency-budget: must be more than 0 ms"):
        parse_ms(text, what="--latency-budget", positive=True)
    assert parse_ms(text) == 0.0


# ------------------------------------------------------------------------------ property test
PROPERTY_OPTS = [o for o in OPTS if o.command in ("cost", "plan", "train", "study run")]
PARSER = build_parser()

numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.integers(min_value=-3, max_value=70_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2.0, max_value=2.0),
    st.sampled_from([math.nan, math.inf, -math.inf, 0, -0.0, 1, 2**32, 2**32 - 1, 4096, 4097]),
)


@settings(max_examples=300, deadline=None)
@given(opt=st.sampled_from(PROPERTY_OPTS), value=numbers)
def test_numeric_options_accept_exactly_their_range(opt, value):
    text = str(value) if isinstance(value, int) else repr(value)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            args = PARSER.parse_args([*BASE[opt.command], f"{opt.flag}={text}"])
        except SystemExit as exc:
            args, code = None, exc.code
    if opt.kind == "int":
        expected = isinstance(value, int) and opt.accepts(value)
    else:
        expected = opt.accepts(float(value))
    if args is not None:
        assert expected, f"{opt} accepted {text}"
        parsed = getattr(args, opt.dest)
        assert parsed == (value if opt.kind == "int" else float(value))
        return
    assert not expected, f"{opt} refused {text}: {stderr.getvalue()}"
    assert code == 2
    assert_named_error(stderr.getvalue(), opt.command, opt.flag, text)


@pytest.mark.parametrize("command", ["plan", "front"])
def test_an_unknown_pick_rule_is_refused_by_parsing(capsys, command):
    code, err = run(capsys, [*BASE[command], "--pick", "max-accuracy"])
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"budgetsearch {command}: error: argument --pick: unknown pick "
                           "rule 'max-accuracy': use best, or min-memory"), err
    args = build_parser().parse_args([*BASE[command], "--pick", "min-memory-within 2%"])
    assert args.pick == "min-memory-within 2%"
