"""meft_ds.cli_args.add_flags: flags from a dataclass, as the trainer and the memory benchmark use it."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meft_ds.cli_args import add_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds benchmarks/

from benchmarks.bench_memory import QUICK, BenchConfig, _parser, config_from_args  # noqa: E402


@dataclass
class Toy:
    size: int | None = field(default=None, metadata={"help": "A size."})
    rate: float = field(default=0.5, metadata={"help": "A rate of 10%."})
    mode: str = field(default="a", metadata={"help": "a or b.", "choices": ("a", "b")})
    fast: bool = field(default=False, metadata={"help": "Off unless given."})
    checked: bool = field(default=True, metadata={"help": "On unless --no-checked. Default: on."})
    depths: tuple[int, ...] = field(default=(1, 2), metadata={"help": "Depths."})


def _parse(argv, **options):
    parser = argparse.ArgumentParser()
    add_flags(parser, Toy, **options)
    return parser, parser.parse_args(argv)


def test_field_defaults_types_and_help():
    parser, args = _parse([])
    assert vars(args) == {"size": None, "rate": 0.5, "mode": "a", "fast": False, "checked": True, "depths": (1, 2)}
    _, args = _parse(["--size", "3", "--rate", "0.25", "--mode", "b", "--fast", "--no-checked", "--depths", "4,8,"])
    assert vars(args) == {"size": 3, "rate": 0.25, "mode": "b", "fast": True, "checked": False, "depths": (4, 8)}
    text = " ".join(parser.format_help().split())
    assert "A rate of 10%. Default: 0.5." in text and "Default: on." in text and "--no-fast" not in text
    assert "Depths. Comma separated. Default: (1, 2)." in text


def test_unset_defaults_are_none_and_both_switch_forms_exist():
    _, args = _parse([], defaults=False)
    assert set(vars(args).values()) == {None}
    _, args = _parse(["--no-fast", "--checked"], defaults=False)
    assert (args.fast, args.checked) == (False, True)


@pytest.mark.parametrize("argv", [["--mode", "c"], ["--depths", "2,x"], ["--size", "1.5"]])
def test_bad_values_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(argv)
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


def test_benchmark_flags_override_the_quick_preset():
    argv = ["--quick", "--depths", "2,4", "--no-padding", "--sections", "count"]
    config = config_from_args(_parser().parse_args(argv))
    assert (config.depths, config.padding, config.sections) == ((2, 4), False, ("count",))
    assert (config.layers, config.seq_lens) == (QUICK["layers"], QUICK["seq_lens"])
    assert config_from_args(_parser().parse_args([])) == BenchConfig()
