"""Instructions per simulated request: a speed figure this host's noise barely moves.

    python -m benchmarks.sim_instructions [--hardware h100-sxm,wse-3]

CPU time on this VM swings by up to 1.5x between runs of the same code, which hides
the 5-20% a change to the engine makes. Instructions executed vary by about 2% from run
to run (allocation addresses differ): valgrind's callgrind counts them for the same
closed-loop level as `sim_speed` (Llama 3.1 8B, prompts 512, outputs 128, 64 users) at
two request counts, and the difference over the difference in requests is the cost of
one request, imports and set-up cancelled out.
Needs `valgrind` on PATH; a run takes about a minute and a half per hardware.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

SMALL, LARGE = 300, 1300
CALLGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")
RUN = "import sys; from benchmarks.sim_speed import run; run(sys.argv[1], 64, int(sys.argv[2]), 1)"


def instructions(hardware: str, requests: int) -> int:
    """Instructions callgrind counted for one whole process simulating `requests`."""
    out = subprocess.run(
        [*CALLGRIND, sys.executable, "-c", RUN, hardware, str(requests)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(re.search(r"Collected : (\d+)", out.stderr).group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hardware", default="h100-sxm,wse-3", help="comma-separated")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("sim_instructions: valgrind is not installed", file=sys.stderr)
        return 2
    print("| hardware | instructions per request |\n|---|---|")
    for hardware in args.hardware.split(","):
        per = (instructions(hardware, LARGE) - instructions(hardware, SMALL)) / (LARGE - SMALL)
        print(f"| {hardware} | {per / 1e6:.3f} million |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
