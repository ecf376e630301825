"""`memorywall fleet`: several emulated workers from a TOML spec, optionally behind smg.

`spec` parses and checks the spec, `faults` its scheduled worker faults (kill, pause,
resume), `runner` starts, watches and stops the processes.
"""
