"""The peer methods' packages (the ``peers`` extra): a valuer built on one checks, when it
is constructed (before anything is trained), that the package imports, and otherwise
stops the run with one line naming the extra."""
from __future__ import annotations

import importlib.util

from bench.core.errors import ConfigError

INSTALL = {
    "kronfluence": "pip install --no-deps kronfluence==1.0.1 and pip install -e '.[peers]' (make venv does both)",
    "dattri": "pip install -e '.[peers]' (make venv does it)",
}


def require(package: str, where: str) -> None:
    """Raise ConfigError at ``where`` (e.g. ``valuer.ekfac``) if ``package`` is not installed."""
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{where}: needs the package {package!r} (the peers extra), which is not installed; "
                          f"{INSTALL.get(package, 'pip install ' + package)}")
