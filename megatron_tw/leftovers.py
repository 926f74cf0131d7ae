"""Temporary outputs that an interrupted earlier run left behind (``*.tmp-<pid>`` names).

The data and checkpoint tools write under ``<name>.tmp-<pid>`` and rename at the end; a run that
is killed (SIGKILL, out of memory, a lost node) cannot remove its temporary files. The next run
with the same output removes those whose process no longer exists. A temporary name whose process
is still alive belongs to a concurrent run and is kept. Process ids are this machine's: two
machines writing one output on a shared file system are not told apart.
"""

from __future__ import annotations

import os
import re
import shutil


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OverflowError:
        return False
    return True


def remove_stale(folder: str, pattern: str) -> list[str]:
    """Remove the entries of ``folder`` whose name fully matches ``pattern`` (a regex whose group
    ``pid`` is the writer's process id) when that process is gone and is not this one.

    Returns the removed paths, sorted. A folder that cannot be listed removes nothing.
    """
    regex = re.compile(pattern)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        match = regex.fullmatch(name)
        if match is None:
            continue
        pid = int(match.group("pid"))
        if pid == os.getpid() or pid_alive(pid):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        except FileNotFoundError:
            continue  # another run cleaned it first
        removed.append(path)
    return removed
