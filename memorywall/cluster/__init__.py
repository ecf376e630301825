"""Beyond one process: work on a process pool or a Ray cluster (`--jobs`, `--ray ADDRESS`).

`pools` runs picklable functions on either behind one `Pool` (simulate's levels, plan's load
searches); `fleet` runs a fleet's workers as Ray actors; `host` is the class each actor wraps.
Ray is imported only inside the `--ray` paths (`pools.connected`): the CLI starts without it.
"""
