"""`memorywall plan`'s search: the cheapest deployment per backend that holds a latency SLO.

`planner` runs the search (`plan`), `space` enumerates and estimates aggregated
candidates, `pd` the disaggregated (prefill on GPUs, decode on wafers) ones, `search`
bisects the highest load a candidate holds, `report` turns a result into a table,
JSON and the Pareto plot. The command's options live in `memorywall.cli.plan`.
"""
