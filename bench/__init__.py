"""dvbench: data valuation for LLM fine-tuning, measured.

Layers (the dependency rule, enforced by tests/test_layers.py):

    cli ─► harness ─► analysis ─► tracking ─► core ◄─ valuers

``core``      the library: data, games, training and scoring, Shapley engine, metrics
``tracking``  provenance, system fingerprint, the versioned run record and its store, W&B
``analysis``  statistics, tables and plots over recorded runs
``harness``   config → objects, the job (exact reference, valuers under budget, metrics, records)
``cli``       the programs, one module each, behind ``dvbench`` / ``python -m bench``
``valuers/``  the methods, each behind ``bench.core.valuation``'s small contract
"""
