"""User-facing errors: one line that names the field and the fix."""
from __future__ import annotations

import sys
from typing import NoReturn


class ConfigError(Exception):
    """A mistake the user can fix (a bad setting, an unwritable folder).

    The message is one line: which field is wrong and what to set instead,
    e.g. ``results_dir: cannot write to /x (read-only); set results_dir=<writable path>``.
    """


def fail(msg: object) -> NoReturn:
    """Print ``error: <msg>`` to stderr and exit with status 2."""
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


class StorageError(ConfigError):
    """The machine's storage failed in a way the user can fix: a full disk, a filesystem
    without ``flock``, a lock held for hours, an artefact that cannot be put in place.
    One line naming the path and the fix; it stops the job (finished work stays cached)."""
