"""mmx.utils.threads.in_passing_thread: the work runs on a thread that has ended by the time the call returns."""

from __future__ import annotations

import threading

import pytest

from mmx.utils.threads import in_passing_thread


def test_runs_on_a_thread_that_ends_and_returns_its_value():
    seen = {}

    def work():
        seen["thread"] = threading.current_thread()
        return 42

    assert in_passing_thread(work) == 42
    assert seen["thread"] is not threading.current_thread()
    assert not seen["thread"].is_alive()


def test_its_exception_reaches_the_caller():
    def work():
        raise FileNotFoundError("no tokenizer.json")

    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        in_passing_thread(work)
