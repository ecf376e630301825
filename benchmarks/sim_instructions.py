"""Instructions per simulated request: a speed figure this host's noise barely moves.

    python -m benchmarks.sim_instructions [--hardware h100-sxm,wse-3]

CPU time on this VM swings by up to 1.5x between runs of the same code, which hides
the 5-20% a change to the engine makes. Instructions executed vary by about 2% from run
to run (allocation addresses differ): valgrind's callgrind counts them for the same
closed-loop level as `sim_speed` (Llama 3.1 8B, prompts 512, outputs 128, 64 users) at
two request counts, and the difference over the difference in requests is the cost of
one request, imports and set-up cancelled out. A third run, with outputs of 640 tokens,
gives what each output token past the first 128 adds: the share of a request's cost that
grows with its length (decoding, KV blocks filled and cached, token times) rather than
being paid once (admission, prompt blocks, records).
Needs `valgrind` on PATH; a run takes about two minutes per hardware.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

from benchmarks.sim_speed import OUTPUT

SMALL, LARGE = 300, 1300
CALLGRIND = ("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null")
LONG = 640  # output tokens of the second point of the per-token figure
RUN = (
    "import sys; from benchmarks.sim_speed import run; "
    "run(sys.argv[1], 64, int(sys.argv[2]), 1, output=int(sys.argv[3]))"
)


def instructions(hardware: str, requests: int, output: int = OUTPUT) -> int:
    """Instructions callgrind counted for one whole process simulating `requests`."""
    out = subprocess.run(
        [*CALLGRIND, sys.executable, "-c", RUN, hardware, str(requests), str(output)],
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
    print("| hardware | instructions per request | per output token past the first 128 |")
    print("|---|---|---|")
    for hardware in args.hardware.split(","):
        small = instructions(hardware, SMALL)
        per = (instructions(hardware, LARGE) - small) / (LARGE - SMALL)
        token = (instructions(hardware, SMALL, LONG) - small) / (SMALL * (LONG - OUTPUT))
        print(f"| {hardware} | {per / 1e6:.3f} million | {token:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
