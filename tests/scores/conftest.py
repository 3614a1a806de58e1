"""Shared fixtures of the scoring tests."""

from __future__ import annotations

import pytest


class _SecondRunInterrupter:
    """``arm()``: the second ``TextTask.train_and_score`` of a job raises KeyboardInterrupt (a
    killed job); ``disarm()``: later jobs run normally."""

    def __init__(self, monkeypatch) -> None:
        from dataorder.scores import text

        self._monkeypatch, self._text, self._real = monkeypatch, text, text.TextTask.train_and_score

    def arm(self) -> None:
        real, started = self._real, []

        def die_on_second_run(task, *args, **kwargs):
            if started:
                raise KeyboardInterrupt
            started.append(1)
            return real(task, *args, **kwargs)

        self._monkeypatch.setattr(self._text.TextTask, "train_and_score", die_on_second_run)

    def disarm(self) -> None:
        self._monkeypatch.setattr(self._text.TextTask, "train_and_score", self._real)


@pytest.fixture
def interrupt_second_text_run(monkeypatch) -> _SecondRunInterrupter:
    return _SecondRunInterrupter(monkeypatch)
