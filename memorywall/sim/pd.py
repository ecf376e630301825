"""`memorywall simulate` on a disaggregated deployment: prefill and decode pools, one link.

With `--prefill-hardware`, the deployment that `--hardware`/`--model`/`--devices` name
becomes the decode pool (`--decode-workers` of it) and `--prefill-workers` workers of
`--prefill-hardware` x `--prefill-devices` prefill for it, the KV crossing `--kv-link`.
Each level runs on `server.pd.cosim.PdOfflineEngine`, released by the same rules as
an aggregated level (`memorywall.sim.simulate`), and writes the same result files. Transfers
at once share the link (a prefill worker's egress, a decode worker's ingress) as the
live workers book them, and a prefill worker holds a prompt's KV until it has landed.
The options that name the fleet are `memorywall.cli.simulate`'s.
"""

from __future__ import annotations

from memorywall.loadgen.bench import BenchConfig, Level, ServerFacts
from memorywall.server.pd.cosim import PdOfflineEngine
from memorywall.server.pd.offline import PdFleet

# The bench runner's release rules, as an aggregated simulation applies them: one way.
from memorywall.sim.simulate import LevelRun, drive_level

__all__ = ["simulate_pd_level"]


def simulate_pd_level(fleet: PdFleet, config: BenchConfig, level: Level) -> LevelRun:
    """One level of `config` on a fresh split fleet."""

    def build() -> tuple[PdOfflineEngine, ServerFacts]:
        engine = PdOfflineEngine(fleet)
        # Named by the fleet; no one profile to predict from, so the prediction columns
        # stay empty.
        facts = ServerFacts(
            hardware=fleet.describe(),
            model=fleet.decode.model.name,
            devices=fleet.devices,
            emulated=True,
        )
        return engine, facts

    return drive_level(build, config, level)
