"""The peer methods' packages (valuers/peers.py): a valuer whose package is missing stops
when it is built, before anything is trained, with one line naming the package and
the ``peers`` extra."""
from __future__ import annotations

import importlib.util

import pytest
from conftest import one_line

from bench.core.errors import ConfigError
from valuers.dattri_valuers import TRAK, TracIn
from valuers.ekfac import EKFAC

PEERS = {"kronfluence": [EKFAC], "dattri": [TRAK, TracIn]}


@pytest.mark.parametrize("package", sorted(PEERS))
def test_a_missing_peer_package_is_one_line_before_training(monkeypatch, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    for cls in PEERS[package]:
        with pytest.raises(ConfigError) as e:
            cls()
        assert one_line(str(e.value)) and "valuer." in str(e.value) and package in str(e.value)
        assert "peers" in str(e.value)
