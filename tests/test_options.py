"""`RestoreOptions` (runtime/options.py): one owner of the option set, spelled the same from the command
line, from an HTTP query and from Python; and the house rules that keep its facts (and the graphs' and
backends') in one place, checked on the source itself so a later change cannot quietly break them."""

from __future__ import annotations

import ast
import hashlib
import pickle
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from adaptbir.runtime.backend import BACKENDS
from adaptbir.runtime.batch import BatchSettings, add_restore_arguments
from adaptbir.runtime.cli import _parser
from adaptbir.runtime.errors import ArgumentError
from adaptbir.runtime.graphs import GRAPHS
from adaptbir.runtime.options import QUERY_FIELDS, RestoreOptions, seed_for

ROOT = Path(__file__).resolve().parents[1]


def _restore_namespace(*argv: str):
    return _parser().parse_args(["restore", "in.png", "-o", "out", "--engines", "e", *argv])


def test_every_field_has_a_flag_and_comes_back_from_the_command_line():
    args = _restore_namespace("--steps", "7", "--seed", "3", "--score", "41.5", "--k", "0.25", "--w", "0.5",
                              "--sr-scale", "2", "--no-resize-back", "--color-fix", "adain", "--tile-size", "512",
                              "--memory-budget", "3G")
    options = RestoreOptions.from_namespace(args)
    assert options == RestoreOptions(steps=7, seed=3, score=41.5, k=0.25, w=0.5, sr_scale=2.0, resize_back=False,
                                     color_fix="adain", tile_size=512, memory_budget=3 * 2**30)
    defaults = RestoreOptions.from_namespace(_restore_namespace())
    assert defaults == RestoreOptions()  # the flags' defaults are the dataclass's: one source


def test_plan_takes_the_planning_fields_and_leaves_the_rest_at_their_defaults():
    args = _parser().parse_args(["plan", "in.png", "--engines", "e", "--score", "50", "--tile-size", "0"])
    assert not hasattr(args, "seed") and not hasattr(args, "steps")
    assert RestoreOptions.from_namespace(args) == RestoreOptions(score=50.0, tile_size=0)


def test_command_line_values_are_checked_as_the_api_checks_them():
    with pytest.raises(ArgumentError, match="w must be from 0 to 100"):
        RestoreOptions.from_namespace(_restore_namespace("--w", "101"))
    with pytest.raises(ArgumentError, match="tile size must be"):
        RestoreOptions.from_namespace(_restore_namespace("--tile-size", "100"))


def test_query_parameters():
    assert RestoreOptions.from_query("seed=1&steps=20&score=55.5&k=0.1&w=0.2") == RestoreOptions(
        seed=1, steps=20, score=55.5, k=0.1, w=0.2)
    assert RestoreOptions.from_query("") == RestoreOptions()
    for query, message in [("tile_size=512", r"unknown parameter\(s\) \['tile_size'\]"),
                           ("memory_budget=1", "unknown"), ("seed=1&seed=2", "given more than once"),
                           ("steps=ten", "'ten' is not a int"), ("w=nan", "w must be a finite number"),
                           ("k=2", "k must be in")]:
        with pytest.raises(ArgumentError, match=message):
            RestoreOptions.from_query(query)
    assert set(QUERY_FIELDS) <= {f.name for f in fields(RestoreOptions)}


def test_seeds_given_random_or_derived_from_the_pixels():
    """Not given, the seed follows the image's pixels (reproducible without --seed, the same in the CLI, Ray and
    the service, which all restore through Pipeline); "random" draws; the spellings are checked alike."""
    image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    other = image.copy()
    other[0, 0, 0] += 1
    assert seed_for(None, image) == seed_for(None, image.copy()) != seed_for(None, other)
    # the documented rule, pinned: a change to it changes every unseeded output, so it is versioned ("seed 1")
    digest = hashlib.sha256(b"adaptbir seed 1 uint8 (6, 8, 3)" + image.tobytes()).digest()
    assert seed_for(None, image) == int.from_bytes(digest[:8], "big") >> 1
    assert seed_for(None, image) != seed_for(None, image.reshape(8, 6, 3))  # the shape counts, not only the bytes
    assert seed_for(5, image) == 5 and seed_for("random", image) != seed_for("random", image)
    assert RestoreOptions.from_query("seed=random") == RestoreOptions(seed="random")
    assert RestoreOptions.from_namespace(_restore_namespace("--seed", "random")).seed == "random"
    with pytest.raises(SystemExit):
        _restore_namespace("--seed", "lucky")
    for make in (lambda: RestoreOptions(seed="lucky"), lambda: RestoreOptions.from_query("seed=lucky")):
        with pytest.raises(ArgumentError, match=r"'lucky'.*an integer from 0 to 2\*\*63 - 1, or random"):
            make()


def test_the_resume_key_holds_every_field_and_changes_with_each():
    base = RestoreOptions()
    assert set(base.key()) == {f.name for f in fields(RestoreOptions)}
    changed = {"steps": 3, "seed": 1, "score": 1.0, "k": 0.5, "w": 0.5, "sr_scale": 2.0, "resize_back": False,
               "color_fix": "wavelet", "tile_size": 0, "memory_budget": 2**30}
    assert set(changed) == set(base.key())  # a field added later must be listed here (and decide outputs)
    for name, value in changed.items():
        assert RestoreOptions(**{name: value}).key() != base.key(), name


def test_steps_are_put_on_the_schedule():
    assert RestoreOptions().for_schedule(50, 1000).steps == 50
    assert RestoreOptions(steps=20).for_schedule(50, 1000).steps == 20
    with pytest.raises(ArgumentError, match="schedule has 10 timesteps"):
        RestoreOptions(steps=20).for_schedule(5, 10)


def test_options_and_settings_pickle_for_ray_actors(tmp_path):
    args = _restore_namespace("--seed", "2", "--format", "jpg", "--quality", "80")
    settings, options = BatchSettings.from_namespace(args), RestoreOptions.from_namespace(args)
    assert pickle.loads(pickle.dumps(settings)) == settings and pickle.loads(pickle.dumps(options)) == options
    assert settings.inputs == (Path("in.png"),) and settings.output_key()["quality"] == 80


@pytest.mark.parametrize("argv,message", [(("--quality", "101"), "--quality must be from 0 to 100"),
                                          (("--threads", "0"), "--threads must be at least 1")])
def test_batch_settings_are_checked_when_made(argv, message):
    with pytest.raises(ArgumentError, match=message):
        BatchSettings.from_namespace(_restore_namespace(*argv))


def test_adaptbir_ray_restore_has_every_flag_of_adaptbir_restore():
    import argparse

    local, ray = argparse.ArgumentParser(), argparse.ArgumentParser()
    add_restore_arguments(local)
    add_restore_arguments(ray)
    assert [a.dest for a in local._actions] == [a.dest for a in ray._actions]
    assert {f.name for f in fields(RestoreOptions)} - {"resize_back"} <= {a.dest for a in local._actions}


# ------------------------------------------------------------------------------------------ house rules


def _sources(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def _is_stage(node: ast.AST) -> bool:
    """`stage` or `x.stage`: a pipeline stage (one is called "musiq" like its graph), not a graph name."""
    return (isinstance(node, ast.Name) and node.id == "stage") or (isinstance(node, ast.Attribute)
                                                                    and node.attr == "stage")


def _compared_literals(path: Path) -> set[str]:
    """Every string constant that takes part in a comparison (==, !=, in, not in) in the file, comparisons
    with a stage aside."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare) and not any(map(_is_stage, (node.left, *node.comparators))):
            for side in (node.left, *node.comparators):
                for const in ast.walk(side):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str):
                        found.add(const.value)
    return found


def test_serve_uses_the_runtime_as_a_library_not_its_command_line():
    for path in _sources("serve"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("adaptbir.runtime.cli",), f"{path.name} imports {node.module}"


# export/checkpoint.py names the checkpoint files a build reads ("musiq" is one), not graphs.
@pytest.mark.parametrize("kind,names,owners", [("backend", set(BACKENDS), {"backend.py"}),
                                               ("graph", set(GRAPHS), {"graphs.py", "checkpoint.py"})])
def test_no_code_branches_on_a_backend_or_graph_name(kind, names, owners):
    """Questions about a backend or a graph go to its description (runtime/backend.py, runtime/graphs.py);
    a comparison with a name elsewhere is a fact kept in a second place."""
    offenders = [f"{path.relative_to(ROOT)}: {sorted(_compared_literals(path) & names)}"
                 for path in _sources("runtime", "export", "serve")
                 if path.name not in owners and _compared_literals(path) & names]
    assert not offenders, f"{kind} names compared outside {owners}: {offenders}"
