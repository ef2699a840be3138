"""SHED (see valuer.py)."""
from valuers.shed.valuer import SHED  # noqa: F401
