"""The background workers: bounded work in flight, the first failure raised where work is
handed out."""

from __future__ import annotations

import threading

import pytest

from importer.workers import Workers


def test_work_in_flight_is_bounded_and_all_of_it_runs() -> None:
    workers = Workers("test", threads=2, depth=2)
    release = threading.Event()
    running = 0
    most = 0
    lock = threading.Lock()

    def work(n: int) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(5)
        with lock:
            running -= 1

    handed = threading.Thread(target=lambda: [workers.submit(work, n) for n in range(6)])
    handed.start()
    handed.join(0.5)
    assert handed.is_alive(), "the third piece waits for a slot"
    release.set()
    handed.join(5)
    workers.wait()
    workers.close()
    assert most == 2 and running == 0


def test_the_first_failure_is_raised_by_wait_and_by_the_next_submit() -> None:
    workers = Workers("test", threads=2)

    def fail() -> None:
        raise ValueError("the disk broke")

    workers.submit(fail)
    with pytest.raises(ValueError, match="the disk broke"):
        workers.wait()
    with pytest.raises(ValueError, match="the disk broke"):
        workers.submit(lambda: None)
    workers.close()
