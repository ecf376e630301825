"""`memorywall calibrate`: fit a hardware profile's efficiencies to measured runs.

`fit` reads the observations, fits and checks the efficiencies and writes the
calibrated profile's TOML. The command's options live in `memorywall.cli.calibrate`.
"""
