"""Every command line of the product, checked by construction: each program and subcommand answers a typo
with its own usage and the closest name, no help text states two defaults, and a reader that goes away
ends a command quietly."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

from adaptbir.benchmarks import bench
from adaptbir.export import cli as export_cli
from adaptbir.runtime import cli as runtime_cli
from adaptbir.runtime.arguments import Parser
from adaptbir.serve import cli as serve_cli

PROGRAMS = {"adaptbir": runtime_cli, "adaptbir-export": export_cli, "adaptbir-ray": serve_cli,
            "adaptbir-bench": bench}


def _commands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _commands(sub)


def _every_command() -> Iterator[argparse.ArgumentParser]:
    for module in PROGRAMS.values():
        yield from _commands(module._parser())


def test_the_entry_points_are_the_programs_checked_here():
    from pathlib import Path

    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert {name: target.split(":")[0] for name, target in scripts.items()} == {
        name: module.__name__ for name, module in PROGRAMS.items()}


@pytest.mark.parametrize("parser", list(_every_command()), ids=lambda p: p.prog)
def test_every_command_answers_typos_and_states_one_default(parser):
    assert isinstance(parser, Parser), f"{parser.prog} is a plain ArgumentParser: typos get no suggestion"
    for action in parser._actions:
        if action.help:  # a help text that says "(default: ...)" itself, given a default as well, says it twice
            shown = parser._get_formatter()._expand_help(action)
            assert shown.count("(default:") <= 1, f"{parser.prog} {action.option_strings}: {shown}"


@pytest.mark.parametrize("argv, usage, hint", [
    (["restore", "a.png", "-o", "out", "--engines", "e", "--stpes", "2"], "usage: adaptbir restore",
     "unrecognized arguments: --stpes 2 (did you mean --steps?)"),
    (["plan", "a.png", "--engines", "e", "--memroy-budget=2G"], "usage: adaptbir plan",
     "(did you mean --memory-budget?)"),
    (["restroe", "a.png"], "usage: adaptbir ", "(did you mean restore?)"),
    (["restore", "a.png", "-o", "o", "--engines", "e", "--backend", "opnevino"], "usage: adaptbir restore",
     "(did you mean openvino?)"),
])
def test_a_typo_gets_the_commands_usage_and_a_suggestion(argv, usage, hint, capsys):
    with pytest.raises(SystemExit) as exited:
        runtime_cli.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(usage) and hint in err, err


def test_export_and_ray_typos_name_their_own_command(capsys):
    with pytest.raises(SystemExit):
        export_cli.main(["build", "--random-weights", "--out", "x", "--precison", "fp16"])
    err = capsys.readouterr().err
    assert err.startswith("usage: adaptbir-export build") and "(did you mean --precision?)" in err
    with pytest.raises(SystemExit):
        serve_cli.main(["serve", "--engines", "e", "--replica", "2", "--prot", "80"])
    assert "(did you mean --port?)" in capsys.readouterr().err


def test_help_of_a_redefined_option_states_its_own_default(capsys):
    with pytest.raises(SystemExit):
        serve_cli.main(["restore", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "CPU threads of each actor (ONNX Runtime or OpenVINO) (default: 1)" in text


def test_a_reader_that_goes_away_ends_the_command_quietly(micro_engines):
    """`adaptbir info DIR | head -1`: exit 141 (as a shell reports SIGPIPE), no traceback."""
    shell = f"{sys.executable} -m adaptbir.runtime.cli info {micro_engines} --no-verify | head -c 10 >/dev/null; " \
            "echo ${PIPESTATUS[0]}"
    done = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "141" and "Traceback" not in done.stderr, done.stderr
