"""``python -m bench ...`` = the ``dvbench`` console script (``bench/cli``)."""
from bench.cli import main

if __name__ == "__main__":
    main()
