"""A results-store writer for the multi-process append test, in a module of its own so
that each spawned process imports only the store (not torch and the test's fixtures)."""
from bench.tracking.store import ResultsStore


def append_many(root, worker: int, n: int, start) -> None:
    start.wait()
    store = ResultsStore(root)
    for i in range(n):
        store.append({"experiment": "toy", "valuer": f"w{worker}", "seed": i, "status": "ok",
                      "owner_values": [float(worker)] * 3000})   # ~15 kB lines: interleaving would show
