"""Token weights under context parallelism (gloo, 2 and 4 ranks) == the single-rank weights.

One torchrun launch per world size runs tests/distributed/weighting_cp_worker.py, which checks
every preset (and a few extra configurations) and the summed weight statistics.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
WORKER = "tests/distributed/weighting_cp_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world_size", [2, 4])
def test_context_parallel_weights_match_single_rank(world_size):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world_size),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), WORKER]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert f"WEIGHTING_CP_OK world={world_size}" in proc.stdout, proc.stdout[-6000:]
