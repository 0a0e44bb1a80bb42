"""partitioner/progress.py: the progress line shows on terminals only, after its delay, and is erased; the passes
are logged on the "partitioner" logger; the search reports into the compile's progress."""

from __future__ import annotations

import io
import logging
import sys

import pytest

import partitioner
import zoo
from partitioner import progress
from partitioner.progress import Progress


class Terminal(io.StringIO):
    """What a terminal receives (an in-memory stream that says it is a TTY)."""

    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(p: Progress, clock: Clock) -> None:
    with p, p.phase("plan"):
        p.work("layouts", total=5)
        for _ in range(5):
            clock.now += 1.0
            p.advance()


def test_the_line_shows_on_a_terminal_after_the_delay_and_is_erased() -> None:
    term, clock = Terminal(), Clock()
    p = Progress("GPT on 8 devices", stream=term, delay=2.5, clock=clock)
    _run(p, clock)
    drawn = [line for line in term.getvalue().split("\r") if line.strip()]
    assert drawn, "nothing was drawn on the terminal"
    assert drawn[0].startswith("partitioner: GPT on 8 devices: plan, 3/5 layouts [3 s]")  # not before 2.5 s
    assert "5/5 layouts" in drawn[-1]
    assert not term.getvalue().split("\r")[-1].strip(), "the line is left on the terminal"


@pytest.mark.parametrize("terminal, enabled", [(False, True), (True, False)])
def test_silent_in_pipes_and_when_disabled(terminal: bool, enabled: bool) -> None:
    stream, clock = (Terminal() if terminal else io.StringIO()), Clock()
    p = Progress("x", stream=stream, delay=0.0, clock=clock, enabled=enabled)
    _run(p, clock)
    assert stream.getvalue() == ""


def test_short_work_stays_silent() -> None:
    term, clock = Terminal(), Clock()
    with Progress("x", stream=term, clock=clock) as p, p.phase("capture"):
        clock.now += 1.9
        p.advance()
    assert term.getvalue() == ""


def test_current_is_the_innermost_progress_and_silent_outside() -> None:
    outside = progress.current()
    assert not outside.enabled
    with Progress("a", stream=io.StringIO()) as a:
        assert progress.current() is a
        with Progress("b", stream=io.StringIO()) as b:
            assert progress.current() is b
        assert progress.current() is a
    assert progress.current() is outside


def _tiny() -> tuple:
    return zoo.get("gpt3-tiny"), zoo.example_inputs("gpt3-tiny", batch=4)


def test_compile_logs_its_passes_and_layout(caplog: pytest.LogCaptureFixture) -> None:
    model, x = _tiny()
    with caplog.at_level(logging.INFO, logger="partitioner"):
        cm = partitioner.compile(model, devices=2, example_inputs=x, device_type="cpu")
    messages = [r.getMessage() for r in caplog.records if r.name == "partitioner"]
    for name in cm.compile_times:
        assert any(f"GPT on 2 devices: {name} took" in m for m in messages), (name, messages)
    assert set(cm.compile_times) == {"capture", "annotate", "batch", "plan", "split"}
    layout = f"pipeline {cm.plan.pipeline_degree} x tensor {cm.plan.tensor_degree} x data {cm.plan.data_degree}"
    assert any(layout in m and "predicted step" in m for m in messages), messages


@pytest.mark.parametrize("verbose", [True, False])
def test_compile_draws_the_search_on_a_terminal_unless_verbose_is_false(
    verbose: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    term = Terminal()
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    monkeypatch.setattr(progress, "REDRAW_S", 0.0)
    monkeypatch.setattr(sys, "stderr", term)
    model, x = _tiny()
    partitioner.compile(model, devices=2, example_inputs=x, device_type="cpu", verbose=verbose)
    shown = term.getvalue()
    if verbose:
        assert "partitioner: GPT on 2 devices: plan, " in shown and "layouts searched [" in shown, shown[-500:]
    else:
        assert shown == ""
