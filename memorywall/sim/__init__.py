"""The offline simulator: the serving engine driven on a virtual clock through bench levels.

`simulate` runs one level on an aggregated deployment (`simulate_level`) and holds the
release rules every simulation shares (`drive_level`); `pd` runs one on a disaggregated
fleet. The `memorywall simulate` command lives in `memorywall.cli.simulate`.
"""
