"""The fake-CUDA tier. Its cases run in a fresh process: the CPU measures (runtime/cpu.py) that
other tests apply in-process redirect CUDA tensors to the CPU, which would hide exactly what the
cases look for."""

import subprocess


def run_cases(path: str) -> None:
    """Run the pytest file ``path`` (relative to the repository root) in a fresh process; every
    case must pass."""
    from tests.launch import PYTHON, ROOT, env

    proc = subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-3000:]
