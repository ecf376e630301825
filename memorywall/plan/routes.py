"""The article's routes (wafer, GPU, inference ASIC, packaging and optical what-ifs): which
built-in profile belongs to which, and one colour family per route, so the study's plots and
`memorywall plan`'s Pareto plot colour the same hardware alike."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt

# Route -> (matplotlib colour map, its profiles); shades within a family in this order. The
# what-if wafer that keeps WSE-3's SRAM is the wafer route's successor.
ROUTES: dict[str, tuple[str, tuple[str, ...]]] = {
    "wafer": ("Reds", ("wse-3", "what-if-wse-flat-sram")),
    "GPU": ("Blues", ("h100-sxm", "h200", "b200", "gb200-nvl72", "mi300x", "mi355x")),
    "inference ASIC": ("Greens", ("tpu-v5e", "tpu-v6e", "tpu-v7", "maia-100", "groq-lpu")),
    "advanced packaging (what-if)": ("Purples", ("what-if-sow-hbm",)),
    "optical I/O (what-if)": ("Oranges", ("what-if-wafer-optical",)),
}

Colour = tuple[float, float, float, float]


def route_of(hardware: str) -> str | None:
    """The route a profile belongs to; None for one the map does not know (a user's TOML)."""
    return next((route for route, (_, names) in ROUTES.items() if hardware in names), None)


def route_colours() -> dict[str, tuple[str, Colour]]:
    """Profile -> (route, colour): darker shades first within each route's family."""
    out = {}
    for route, (family, names) in ROUTES.items():
        cmap = plt.get_cmap(family)
        for i, hw in enumerate(names):
            out[hw] = (route, cmap(0.9 - 0.5 * i / max(1, len(names) - 1)))
    return out
