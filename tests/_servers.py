"""Real servers on 127.0.0.1 for tests: start in their own process group, wait until an
HTTP endpoint answers, stop with SIGTERM to the group (SIGKILL if it lingers)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(cmd: list[str], ready_url: str, log_path: Path, *, env: dict | None = None,
                   cwd: str | os.PathLike | None = None, ready: Callable[[requests.Response], bool] = lambda r: r.ok,
                   start_limit_s: float = 300, stop_limit_s: float = 60) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` until the ``with`` block ends; yields once ``ready_url`` answers ``ready``."""
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + start_limit_s
        while True:
            assert proc.poll() is None, Path(log_path).read_text()[-3000:]
            try:
                if ready(requests.get(ready_url, timeout=5)):
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:  # start-up wait limit, not a timing check
                pytest.fail(f"{cmd[0]} did not come up at {ready_url}")
            time.sleep(0.5)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=stop_limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
