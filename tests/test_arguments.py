"""Every argument of the API, whatever its type or value, is either accepted or refused with a one-line
`ArgumentError`/`InputError` before any engine runs — never a TypeError, a ZeroDivisionError or a late,
misleading failure. The hostile values are tried on *every* field of `RestoreOptions` (read from the
dataclass) and every keyword-only argument of `Pipeline.restore` and `Pipeline.plan` (read from their
signatures), through both entries, so an option added later is covered too.
"""

from __future__ import annotations

import inspect
from dataclasses import fields, replace

import numpy as np
import pytest
from PIL import Image

from adaptbir.runtime.errors import ArgumentError, InputError
from adaptbir.runtime.pipeline import Pipeline, RestoreOptions

# Values no keyword accepts as given, or accepts only when valid: wrong types, non-finite, finite as a
# Python float but infinite as the float32 the graphs get, out of every integer range, lists, objects.
HOSTILE = ["12", "lots", float("nan"), float("inf"), -float("inf"), 1e39, -1e39, 2**80, -(2**80), -1, True,
           [1], {"a": 1}, object(), b"\x00", 1 + 2j]


# The hostile values that are valid: budgets of a size string ("12" = 12 GiB) or of more bytes than any machine
# has (never tile), any finite score (the gate clamps it; random weights give negative scores), a flag's True.
VALID = [("memory_budget", "12"), ("memory_budget", 1e39), ("memory_budget", 2**80), ("score", -1),
         ("score", 2**80), ("score", -(2**80)), ("resize_back", True)]


def _id(value: object) -> str:
    """A test id that is the same in every pytest-xdist worker (an object's repr holds its address)."""
    return "object()" if type(value) is object else repr(value)


class EngineRan(Exception):
    """Raised by a stand-in engine: the arguments were accepted and the restore went on."""


@pytest.fixture(scope="module")
def pipeline(micro_engines):
    return Pipeline.from_engines(micro_engines, threads=1)


@pytest.fixture
def guarded(pipeline, monkeypatch):
    def run(*_args, **_kwargs):
        raise EngineRan

    monkeypatch.setattr(pipeline.engines, "run", run)
    return pipeline


def _keywords(function) -> list[str]:
    """The options' fields and the function's own keyword-only arguments (callbacks, golden inputs)."""
    own = [name for name, p in inspect.signature(function).parameters.items() if p.kind is p.KEYWORD_ONLY]
    return [f.name for f in fields(RestoreOptions)] + own


def _outcome(call) -> str:
    try:
        call()
    except EngineRan:
        return "accepted"
    except ArgumentError as err:
        assert "\n" not in str(err), err
        return "refused"
    return "accepted"


@pytest.mark.parametrize("keyword", _keywords(Pipeline.restore))
@pytest.mark.parametrize("value", HOSTILE, ids=_id)
def test_every_restore_keyword_refuses_hostile_values_before_any_engine(guarded, keyword, value):
    outcome = _outcome(lambda: guarded.restore(np.full((32, 32, 3), 90, np.uint8), **{"steps": 2, keyword: value}))
    assert outcome == ("accepted" if (keyword, value) in VALID else "refused"), (keyword, value)


@pytest.mark.parametrize("keyword", _keywords(Pipeline.plan))
@pytest.mark.parametrize("value", HOSTILE, ids=_id)
def test_every_plan_keyword_refuses_hostile_values(pipeline, keyword, value):
    outcome = _outcome(lambda: pipeline.plan((64, 64), **{keyword: value}))
    assert outcome == ("accepted" if (keyword, value) in VALID else "refused"), (keyword, value)


@pytest.mark.parametrize("value,message", [
    (1e39, "within float32"), (-1e39, "within float32"), (3.5e38, "within float32")])
@pytest.mark.parametrize("keyword", ["w", "k", "score", "sr_scale"])
def test_floats_are_checked_as_the_float32_the_graphs_get(guarded, keyword, value, message):
    with pytest.raises(ArgumentError, match=f"{keyword} must be a finite number.*{message}"):
        guarded.restore(np.zeros((32, 32, 3), np.uint8), steps=2, **{keyword: value})


@pytest.mark.parametrize("size", [(0, 0), (0, 16), (16, 0)])
def test_empty_images_are_refused_in_one_line(guarded, size):
    for image in (Image.new("RGB", size), np.zeros((size[1], size[0], 3), np.uint8)):
        with pytest.raises(InputError, match="empty"):
            guarded.restore(image, steps=2)


@pytest.mark.parametrize("budget,expected", [("12G", 12 * 2**30), ("800M", 800 * 2**20), (2**31, 2**31),
                                             (3.0e9, 3_000_000_000)])
def test_memory_budget_as_bytes_or_a_size(pipeline, budget, expected):
    plan = pipeline.plan((64, 64), memory_budget=budget)
    assert plan.budget == expected


@pytest.mark.parametrize("budget", ["0.0000001k", 0, 0.5, "12X", float("nan")])
def test_memory_budget_below_a_byte_or_unreadable_is_refused(pipeline, budget):
    with pytest.raises(ArgumentError, match="memory"):
        pipeline.plan((64, 64), memory_budget=budget)


def test_steps_above_the_schedule_are_refused_before_any_engine(guarded, monkeypatch):
    schedule = replace(guarded.manifest.schedule, timesteps=20)
    monkeypatch.setattr(guarded, "manifest", replace(guarded.manifest, schedule=schedule))
    with pytest.raises(ArgumentError, match=r"from 2 to 20 .*schedule has 20 timesteps"):
        guarded.restore(np.zeros((32, 32, 3), np.uint8), steps=21)
    assert _outcome(lambda: guarded.restore(np.zeros((32, 32, 3), np.uint8), steps=20)) == "accepted"


@pytest.mark.parametrize("field", [f.name for f in fields(RestoreOptions)])
@pytest.mark.parametrize("value", HOSTILE, ids=_id)
def test_every_option_refuses_hostile_values_when_made(field, value):
    """The same verdict as through `restore`: the options are checked once, where they are made."""
    try:
        RestoreOptions(**{field: value})
    except ArgumentError as err:
        assert "\n" not in str(err)
        outcome = "refused"
    else:
        outcome = "accepted"
    assert outcome == ("accepted" if (field, value) in VALID else "refused"), (field, value)


def test_options_and_keywords_agree(guarded, monkeypatch):
    """`restore(image, options)` and `restore(image, **fields)` are one call; keywords change given options."""
    calls = []
    monkeypatch.setattr(guarded.stages, "run",
                        lambda x, decision, **kw: calls.append((decision, kw["steps"], kw["seed"])) or 1 / 0)
    image = np.full((32, 32, 3), 90, np.uint8)
    for call in (lambda: guarded.restore(image, RestoreOptions(seed=4, steps=3, score=50.0, w=0.25)),
                 lambda: guarded.restore(image, seed=4, steps=3, score=50.0, w=0.25),
                 lambda: guarded.restore(image, RestoreOptions(seed=9, steps=3, score=50.0), seed=4, w=0.25)):
        with pytest.raises(ZeroDivisionError):
            call()
    assert calls[0] == calls[1] == calls[2] and calls[0][0].w == 0.25 and calls[0][1:] == (3, 4)


def test_steps_default_to_the_schedule(guarded, monkeypatch):
    schedule = replace(guarded.manifest.schedule, default_steps=7)
    monkeypatch.setattr(guarded, "manifest", replace(guarded.manifest, schedule=schedule))
    assert guarded.options().steps == 7 and guarded.options(steps=3).steps == 3
    assert RestoreOptions().steps is None  # not given: the directory decides


def test_callbacks_must_be_callable(guarded):
    for keyword in ("progress", "on_stage"):
        with pytest.raises(ArgumentError, match=f"{keyword} must be a callable"):
            guarded.restore(np.zeros((32, 32, 3), np.uint8), steps=2, **{keyword: 5})
