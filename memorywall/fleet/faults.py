"""Worker-level faults in a fleet: kill, pause (SIGSTOP) and resume (SIGCONT) on a schedule.

A spec's `[[fault]]` tables name a worker, a time after the fleet is up and an
action; `pause` may give `for_s`, which adds the matching `resume`:

    [[fault]]
    worker = "h100-b"
    at_s = 20
    action = "pause"       # kill | pause | resume
    for_s = 10

A killed worker stays dead and the fleet goes on (an unplanned death still
stops the fleet). Every action taken is appended to `<log dir>/faults.jsonl`
(one JSON object a line: time, worker, action, pid), so a study reads what
happened from a file, not from the log.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from memorywall.errors import ConfigError

FAULT_KEYS = {"worker", "at_s", "action", "for_s"}
LOG_NAME = "faults.jsonl"


class WorkerAction(Enum):
    KILL = "kill"
    PAUSE = "pause"
    RESUME = "resume"

    @property
    def signal(self) -> signal.Signals:
        return {
            WorkerAction.KILL: signal.SIGKILL,
            WorkerAction.PAUSE: signal.SIGSTOP,
            WorkerAction.RESUME: signal.SIGCONT,
        }[self]


@dataclass(frozen=True, order=True)
class WorkerFault:
    at_s: float  # seconds after the fleet is up
    worker: str
    action: WorkerAction


def _seconds(origin: str, field: str, value: Any, *, positive: bool) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{origin}: {field}: must be a number of seconds, got {value!r}")
    if value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"{origin}: {field}: must be {bound}, got {value!r}")
    return float(value)


def parse_faults(origin: str, raw: Any, workers: set[str]) -> tuple[WorkerFault, ...]:
    """The `[[fault]]` tables, sorted by time; a pause with `for_s` gains its resume."""
    if not isinstance(raw, list):
        raise ConfigError(f"{origin}: fault: must be [[fault]] tables")
    out: list[WorkerFault] = []
    for i, table in enumerate(raw):
        where = f"fault[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{origin}: {where}: must be a table ([[fault]])")
        extra = sorted(set(table) - FAULT_KEYS)
        if extra:
            expected = ", ".join(sorted(FAULT_KEYS))
            raise ConfigError(f"{origin}: {where}.{extra[0]}: unknown field (expected: {expected})")
        for key in ("worker", "at_s", "action"):
            if key not in table:
                raise ConfigError(f"{origin}: {where}.{key}: missing")
        if table["worker"] not in workers:
            raise ConfigError(
                f"{origin}: {where}.worker: {table['worker']!r} is not a worker of this fleet"
            )
        try:
            action = WorkerAction(table["action"])
        except ValueError:
            names = ", ".join(a.value for a in WorkerAction)
            raise ConfigError(
                f"{origin}: {where}.action: {table['action']!r} is not one of {names}"
            ) from None
        at_s = _seconds(origin, f"{where}.at_s", table["at_s"], positive=False)
        out.append(WorkerFault(at_s, table["worker"], action))
        if "for_s" in table:
            if action is not WorkerAction.PAUSE:
                raise ConfigError(f"{origin}: {where}.for_s: only a pause lasts")
            for_s = _seconds(origin, f"{where}.for_s", table["for_s"], positive=True)
            out.append(WorkerFault(at_s + for_s, table["worker"], WorkerAction.RESUME))
    return tuple(sorted(out))


class FaultSchedule:
    """Applies the faults that are due; `killed` names the workers it killed on purpose."""

    def __init__(self, faults: tuple[WorkerFault, ...], log_dir: Path) -> None:
        self._pending = list(faults)
        self.log = log_dir / LOG_NAME
        self.killed: set[str] = set()
        self._start_s: float | None = None

    def start(self) -> None:
        """The fleet is up: `at_s` counts from now."""
        self._start_s = time.monotonic()
        if self._pending:
            self.log.write_text("")

    def apply_due(
        self, pids: dict[str, int], send: Callable[[int, int], None] = os.kill
    ) -> list[WorkerFault]:
        """Signal each worker whose fault is due, by `send(pid, signal)` (a fleet on a
        cluster sends it through the worker's actor); returns what was done."""
        if self._start_s is None:
            return []
        elapsed = time.monotonic() - self._start_s
        done = []
        while self._pending and self._pending[0].at_s <= elapsed:
            fault = self._pending.pop(0)
            pid = pids[fault.worker]
            if fault.action is WorkerAction.KILL:
                self.killed.add(fault.worker)
            try:
                send(pid, fault.action.signal)
            except ProcessLookupError:
                continue  # already gone
            record = {"t_s": elapsed, "worker": fault.worker, "action": fault.action.value}
            with self.log.open("a") as f:
                f.write(json.dumps({**record, "pid": pid}) + "\n")
            done.append(fault)
        return done
