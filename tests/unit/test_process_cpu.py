"""bench/process_cpu.py: the cores a group of processes used over a window, read from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench.process_cpu import ProcessCpu, children, cpu_seconds

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads Linux's /proc")


def test_a_spinning_process_counts_its_cores_and_a_sleeping_one_none():
    spinning = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    sleeping = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert {spinning.pid, sleeping.pid} <= set(children(os.getpid()))
        cpu = ProcessCpu(lambda: {"spin": [spinning.pid], "sleep": [sleeping.pid], "gone": [2**22 + 1]},
                         period_s=0.2)
        start = time.monotonic()
        time.sleep(2.0)
        cpu.stop()
        cores = cpu.cores(start + 0.5, time.monotonic())  # after both interpreters started
    finally:
        spinning.kill()
        sleeping.kill()
        spinning.wait()
        sleeping.wait()
    # one busy thread: up to a core, less when the machine's other work takes its share
    assert 0.3 <= cores["spin"] <= 1.1
    assert cores["sleep"] <= 0.05
    assert cores["gone"] == 0.0  # a pid that never existed counts nothing
    assert cores["machine_busy"] >= cores["spin"] - 0.05  # the spinning process is part of the machine's work


def test_a_window_without_two_samples_has_no_figures():
    cpu = ProcessCpu(lambda: {"me": [os.getpid()]}, period_s=10.0)
    cpu.stop()
    assert cpu.cores(time.monotonic() - 100, time.monotonic()) == {"me": None, "machine_busy": None}


def test_a_process_that_is_gone_has_no_cpu_seconds():
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    assert cpu_seconds(done.pid) is None
    assert cpu_seconds(os.getpid()) > 0
