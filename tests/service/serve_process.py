"""``flywheel serve`` as a real process for the tests that kill it: in a session of its own, so
a signal to its group reaches its writer process too."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .conftest import free_port


def spawn_serve(config: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """Start ``flywheel serve`` on ``config`` (its folder the working one) with ``env`` added;
    the process and its base URL. ``wait_up`` waits for it."""
    port = free_port()
    full_env = {**os.environ, "FLYWHEEL_CONFIG": str(config), **env}
    full_env.pop("FLYWHEEL_STORE_URL", None)  # the config names the store
    proc = subprocess.Popen(
        [sys.executable, "-c", "from flywheel_middleware.cli import main; main()", "serve"]
        + ["--port", str(port), "--config", str(config)],
        cwd=config.parent,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def wait_up(proc: subprocess.Popen, base: str) -> None:
    """Return once the service answers its health check; fail with its stderr if it died."""
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "flywheel serve did not come up"
        time.sleep(0.1)
