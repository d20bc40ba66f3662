"""The liveness rule of claims shared by workers (budgetsearch.store.worker_gone)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from budgetsearch.store import worker_gone, worker_id


def _exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_worker_with_a_fresh_heartbeat_keeps_its_claim():
    assert not worker_gone(worker_id(), time.time(), 60.0)


def test_a_worker_whose_process_exited_on_this_host_is_gone_at_once():
    worker = f"{socket.gethostname()}:{_exited_pid()}:abcd1234"
    assert worker_gone(worker, time.time(), 3600.0)


def test_a_live_worker_whose_heartbeat_is_too_old_is_gone():
    worker = f"{socket.gethostname()}:{os.getpid()}:abcd1234"
    assert worker_gone(worker, time.time() - 120.0, 60.0)
    assert not worker_gone(worker, time.time() - 30.0, 60.0)


def test_another_hosts_worker_is_judged_by_its_heartbeat_alone():
    # its pid means nothing here, even one that exists on this host (ours) or one that does not
    for pid in (os.getpid(), _exited_pid()):
        worker = f"not-{socket.gethostname()}:{pid}:abcd1234"
        assert not worker_gone(worker, time.time(), 60.0)
        assert worker_gone(worker, time.time() - 120.0, 60.0)
