"""DPO language-model arithmetic, generation mode (see valuer.py)."""
from valuers.arith_generation.valuer import DPOArithmeticGeneration  # noqa: F401
