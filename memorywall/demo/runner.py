"""`memorywall demo`: an emulated wafer and an emulated GPU serving the same load, side by side.

Starts one real `memorywall serve` process per hardware on loopback (free ports, learnt
from each server's ready file), drives each in turn with a short closed-loop sweep from the
load generator, stops them, and prints what users got on each: TTFT, TPOT, per-user and
aggregate tokens/s, tokens/s per device and per kW of rated power, each measured figure
above the core's prediction for the same load. Plots and raw results go to one folder.

Ctrl-C (SIGINT) or SIGTERM stops the servers and exits 130; a server that does not start
is a one-line error and exit 1.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from memorywall import launch
from memorywall.core import load_hardware
from memorywall.core.deployment import DeploymentNames
from memorywall.demo.config import DemoConfig
from memorywall.demo.report import hints, table, users_text
from memorywall.errors import MemorywallError
from memorywall.launch import Child
from memorywall.ready import ReadyError, ServerReady

if TYPE_CHECKING:
    from memorywall.dashboard.site import DashboardThread
    from memorywall.loadgen.bench import BenchConfig

EXIT_RUNTIME = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class DemoError(Exception):
    """Something failed while the demo ran (not a bad flag): exit 1 with this one line."""


@dataclass
class _Server:
    hardware: str
    child: Child

    @property
    def ready(self) -> ServerReady | None:
        return self.child.ready

    @property
    def name(self) -> str:
        return self.hardware if self.ready is None else f"{self.hardware} x{self.ready.devices}"

    @property
    def served(self) -> ServerReady:
        """Its ready file, once `Servers.wait_ready` has read it."""
        if self.ready is None:
            raise DemoError(f"the {self.hardware} server is not ready")
        return self.ready


@dataclass
class Servers:
    """The demo's `memorywall serve` processes: started together, always stopped."""

    config: DemoConfig
    folder: Path
    running: list[_Server] = field(default_factory=list)

    def start(self) -> None:
        for hw in self.config.hardware:
            args = ["--hardware", hw, "--model", self.config.model, "--host", "127.0.0.1"]
            args += ["--port", "0", "--http-port", "0", "--grace", "1"]
            # Their own session: a terminal's Ctrl-C reaches the demo, which stops them; and
            # they stop by themselves if the demo is killed.
            child = launch.start_serve(
                hw,
                args,
                self.folder / f"{hw}.ready.json",
                log=self.folder / f"{hw}.log",
                die_with_parent=True,
            )
            self.running.append(_Server(hw, child))

    def wait_ready(self) -> None:
        try:
            launch.wait_ready(
                [s.child for s in self.running], timeout_s=self.config.startup_timeout_s
            )
        except launch.ChildExited as e:
            line = e.child.last_line()
            raise DemoError(f"the {e.child.name} server {e}{f': {line}' if line else ''}") from None
        except launch.NotReady as e:
            late = ", ".join(c.name for c in e.late)
            raise DemoError(
                f"the {late} server did not start within "
                f"{self.config.startup_timeout_s:g} s; see {self.folder}"
            ) from None
        except ReadyError as e:
            raise DemoError(str(e)) from None

    def stop(self) -> None:
        """SIGTERM each server still running, wait, then SIGKILL."""
        launch.stop([s.child for s in self.running], timeout_s=self.config.stop_timeout_s)


@contextmanager
def _interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt, even where the demo was started with
    SIGINT ignored (a background job of a script), so either one stops the servers."""
    previous = {
        sig: signal.signal(sig, signal.default_int_handler)
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _sweep(server: _Server, config: DemoConfig, out: Path, err: TextIO) -> list[dict]:
    """The closed-loop levels against one server, each level's files written as it ends."""
    from memorywall.loadgen.bench import BenchConfig, Level, ServerFacts, run_level, write_level
    from memorywall.loadgen.cli import write_sweep
    from memorywall.loadgen.workload import Fixed, SyntheticWorkload

    ready = server.served
    target = ready.grpc_target
    if target is None:  # started with --port 0, it has one
        raise DemoError(f"the {server.hardware} server reported no gRPC port")
    facts = ServerFacts(
        hardware=ready.hardware, model=ready.model, devices=ready.devices, emulated=True
    )
    tdp_w = load_hardware(server.hardware).tdp_w
    results = []
    for users in config.levels:
        bench = BenchConfig(
            target=target,
            workload=SyntheticWorkload(Fixed(config.prompt_tokens), Fixed(config.output_tokens)),
            num_prompts=config.requests(users),
            concurrency=(users,),
            warmup=2,  # a fresh server's first streams are slow; keep them out
            label=server.hardware,
        )
        started = time.perf_counter()
        result, records = run_level(bench, Level(f"c{users}", users, None), facts)
        result["tdp_w"] = tdp_w  # rated power per device, for tokens/s per kW
        result["offline"] = _simulated(server, ready, bench, users)
        write_level(out, result, records)
        results.append(result)
        # The load generator's bar (on a terminal only) ends without a newline: clear it.
        end = "\r\033[K" if err.isatty() else ""
        print(
            f"{end}{server.name}: {users_text(users)}, {bench.num_prompts} requests in "
            f"{time.perf_counter() - started:.1f} s",
            file=err,
            flush=True,
        )
    write_sweep(out, server.hardware, results)  # summary.json, as `bench --out` writes it
    return results


def _simulated(server: _Server, ready: ServerReady, bench: BenchConfig, users: int) -> dict:
    """The same level on the same engine and core, on a virtual clock (`memorywall simulate`):
    what the emulator should deliver when its host keeps up."""
    from memorywall.loadgen.bench import Level
    from memorywall.server.engine.scheduler import EngineConfig
    from memorywall.sim.simulate import simulate_level

    names = DeploymentNames(hardware=server.hardware, model=ready.model, devices=ready.devices)
    deployment = names.build()
    engine = EngineConfig(
        max_num_seqs=ready.max_num_seqs, max_num_batched_tokens=ready.max_num_batched_tokens
    )
    run = simulate_level(deployment, engine, bench, Level(f"c{users}", users, None))
    keys = ("mean_ttft_ms", "mean_tpot_ms", "output_throughput")
    return {k: run.result.get(k) for k in keys}


def _write(
    config: DemoConfig, servers: list[_Server], sweeps: dict[str, list[dict]], text: str
) -> None:
    from memorywall.loadgen import plots

    out = config.out
    labelled = [(s.name, sweeps[s.hardware]) for s in servers]
    plots.per_user_vs_load(labelled, out / "per_user_vs_load.png")
    plots.throughput_vs_interactivity(labelled, out / "throughput_vs_interactivity.png")
    plots.latency_vs_load(labelled, out / "latency_vs_load.png")
    (out / "table.txt").write_text(text + "\n")
    raw = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "servers": {s.hardware: s.served.as_dict() for s in servers},
        "results": sweeps,
    }
    (out / "results.json").write_text(json.dumps(raw, indent=2))


def _wait_for_interrupt(servers: Servers, out: TextIO) -> None:
    print("servers up; Ctrl-C (SIGINT) or SIGTERM stops them", file=out, flush=True)
    while True:
        for s in servers.running:
            if not s.child.alive():
                raise DemoError(
                    f"the {s.hardware} server exited (status {s.child.proc.returncode})"
                )
        time.sleep(0.2)


def _start_dashboard(servers: Servers, err: TextIO) -> DashboardThread:
    """The live dashboard on the demo's servers, in a thread of this process; its URL is
    printed, and opened where a graphical browser is."""
    from memorywall.dashboard.browser import open_page
    from memorywall.dashboard.site import DashboardThread
    from memorywall.dashboard.sources import target_from_ready

    targets = [target_from_ready(s.hardware, s.served) for s in servers.running]
    dashboard = DashboardThread(targets)
    url = dashboard.start()
    opened = " (opened in your browser)" if open_page(url) else ""
    print(f"dashboard: {url}{opened}", file=err, flush=True)
    return dashboard


def run(config: DemoConfig, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run the demo; 0 when done, 1 on a runtime failure, 130 when interrupted."""
    started = time.perf_counter()
    servers = Servers(config, config.out / "servers")
    dashboard: DashboardThread | None = None
    try:
        with _interruptible():
            config.out.mkdir(parents=True, exist_ok=True)
            print(
                f"starting {', '.join(config.hardware)} serving {config.model} ...",
                file=err,
                flush=True,
            )
            servers.start()
            servers.wait_ready()
            names = ", ".join(f"{s.name} at {s.served.grpc_target}" for s in servers.running)
            print(f"ready: {names}", file=err, flush=True)
            if config.dashboard:
                dashboard = _start_dashboard(servers, err)
            sweeps = {
                s.hardware: _sweep(s, config, config.out / s.hardware, err) for s in servers.running
            }
            if not config.keep_serving:
                servers.stop()
            text = table(config, [(s.name, sweeps[s.hardware]) for s in servers.running])
            print(text, file=out)
            _write(config, servers.running, sweeps, text)
            print(
                f"\nwrote {config.out}/ (table, plots, raw results) in "
                f"{time.perf_counter() - started:.0f} s",
                file=out,
                flush=True,
            )
            if config.keep_serving:
                print(hints(config, [s.served for s in servers.running]), file=out, flush=True)
                _wait_for_interrupt(servers, out)
    except KeyboardInterrupt:
        servers.stop()
        print("\nmemorywall demo: interrupted; servers stopped", file=err, flush=True)
        return EXIT_INTERRUPTED
    except (DemoError, OSError, MemorywallError) as e:
        print(f"memorywall: error: {e}", file=err, flush=True)
        return EXIT_RUNTIME
    finally:
        if dashboard is not None:
            dashboard.stop()
        servers.stop()
    return 0
