"""What a valuer needs, in one import: the contract types of ``bench.core.valuation``.

A valuer is a class with ``name`` and ``value(game, budget) -> Valuation`` (and,
optionally, ``check(game)``), built by Hydra from ``conf/valuer/<name>.yaml``. It
uses the game only through ``GameView`` (utilities, tables, trained models, a
folder for its artefacts) and never sees the planted noise. It respects the
budget: the game raises ``BudgetExhausted`` past it; a sampling method catches it
and returns what it has. Adding a method = a module here, a YAML in
``conf/valuer/`` and a test; nothing in ``bench/`` changes.
"""
from bench.core.valuation import (  # noqa: F401  (the valuer-facing API)
    Budget, BudgetExhausted, Cost, CostMeter, GameView, Step, Valuation, Valuer, owner_sums)
