"""A fleet worker: a `[[worker]]` table is `memorywall serve`'s options, by the same names.

The schema is serve's own argparse parser (`memorywall.cli.serve.build_parser`): every
option is a key named by its long flag without the dashes, `-` written `_`
(`--max-num-seqs 64` is `max_num_seqs = 64`); a flag without a value (`--no-prefix-caching`)
is a boolean, `true` to give it. A table is turned into argv generically (`argv`) and
checked by parsing that argv with the real parser, one key at a time so that an error
names its key. `name`, `protocol` (the smg engine it looks like: `spec.py` turns it into
`grpc_services`) and `node` (`fleet --ray`: the Ray custom resource of the node to run
on) are the fleet's own keys, and the options the fleet itself controls
(the host, the ready file, a prefill worker's bootstrap port, TLS and the API key) are
refused with the reason. `port` defaults to 0 (any free port) in a fleet.
"""

from __future__ import annotations

import argparse
import difflib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from memorywall.core import load_hardware, load_model
from memorywall.core.kv_transfer import parse_link
from memorywall.errors import ConfigError, MemorywallError
from memorywall.server.grpc_services import (
    DEFAULT_GRPC_SERVICES,
    SMG_ENGINES,
    parse_services,
    smg_engine,
)

FLEET_KEYS = ("name", "protocol", "node")
# The engines whose worker service smg speaks (`protocol = ...`); SGLang's is serve's default.
PROTOCOLS = SMG_ENGINES
# Serve options a fleet sets for its workers, and where the user says them instead.
REFUSED = {
    "host": "the fleet binds every worker to 127.0.0.1",
    "ready_file": "the fleet gives each worker <log dir>/<name>.ready.json",
    "bootstrap_port": "the fleet gives each prefill worker a free one (named in its ready file)",
    "tls_cert": "set [tls] cert, for every worker",
    "tls_key": "set [tls] key, for every worker",
    "tls_client_ca": "set [tls] client_ca, for every worker",
    "api_key": "set MEMORYWALL_API_KEY in the fleet's environment (it reaches every worker)",
}
# Serve defaults a fleet changes: its workers take any free gRPC port unless told one.
FLEET_DEFAULTS = {"port": 0}
PORT_KEYS = ("port", "http_port", "metrics_port", "dcgm_port")
_ARGUMENT = re.compile(r"^argument [^:]+: ")


@dataclass(frozen=True, init=False)
class WorkerSpec:
    """One worker: its name and its serve options by key (values as TOML gives them).
    `WorkerSpec("a", hardware="wse-3", model="llama-3.1-8b", max_num_seqs=64)`; a None
    value is an option not given."""

    name: str
    options: dict[str, Any]
    node: str | None = None  # on a Ray cluster: the custom resource it is pinned to

    def __init__(self, name: str, *, node: str | None = None, **options: Any) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "node", node)
        object.__setattr__(self, "options", {k: v for k, v in options.items() if v is not None})

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, FLEET_DEFAULTS.get(key, default))

    @property
    def hardware(self) -> str:
        return self.options["hardware"]

    @property
    def model(self) -> str:
        return self.options["model"]

    @property
    def devices(self) -> int | None:
        return self.get("devices")

    @property
    def port(self) -> int:
        return self.get("port")

    @property
    def http_port(self) -> int | None:
        return self.get("http_port")

    @property
    def role(self) -> str:
        return self.get("role", "both")

    @property
    def kv_link(self) -> str | None:
        link = self.get("kv_link")
        return None if link is None else str(link)

    @property
    def faults(self) -> str | None:
        return self.get("faults")

    @property
    def fault_seed(self) -> int:
        return self.get("fault_seed", 0)

    @property
    def protocol(self) -> str | None:
        """The smg engine whose worker service it serves (`grpc_services`), or None."""
        services = self.get("grpc_services")
        try:
            return smg_engine(parse_services(services) if services else DEFAULT_GRPC_SERVICES)
        except ValueError:  # a bad list: `check` names it
            return None

    def argv(self) -> list[str]:
        """The serve options, as `memorywall serve` takes them (the fleet's own not included:
        host, ready file, bootstrap port, TLS)."""
        return to_argv({**FLEET_DEFAULTS, **self.options})


@cache
def serve_options() -> dict[str, argparse.Action]:
    """Every serve option by its key (`--max-num-seqs`: `max_num_seqs`)."""
    # Imported here: the CLI package imports the fleet's.
    from memorywall.cli.serve import build_parser

    out = {}
    for action in build_parser()._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs and not isinstance(action, argparse._HelpAction):
            out[longs[0][2:].replace("-", "_")] = action
    return out


def _is_flag(action: argparse.Action) -> bool:
    return action.nargs == 0


def _option_argv(key: str, value: Any) -> list[str]:
    """One key as argv; a value of the wrong shape is a ConfigError (message without the key)."""
    action = serve_options()[key]
    flag = action.option_strings[-1]
    if _is_flag(action):
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false (the flag {flag}), got {value!r}")
        return [flag] if value else []
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"must be a string or a number ({flag}), got {value!r}")
    return [flag, str(value)]


def to_argv(options: dict[str, Any]) -> list[str]:
    """Serve's argv for options by key (unknown keys are a ConfigError)."""
    known = serve_options()
    argv: list[str] = []
    for key, value in options.items():
        if key not in known:
            raise ConfigError(f"{key}: not a memorywall serve option")
        argv += _option_argv(key, value)
    return argv


def parse_argv(argv: list[str]) -> argparse.Namespace:
    """Serve's argv parsed by serve's own parser; a bad flag or value is a ConfigError."""
    from memorywall.cli.serve import build_parser
    from memorywall.cli.usage import UsageError

    try:
        return build_parser().parse_args(argv)
    except UsageError as e:
        raise ConfigError(_ARGUMENT.sub("", str(e))) from None


def _check_type(value: Any, parsed: Any) -> None:
    """TOML's type must be the option's: an integer option takes no string ("2")."""
    if isinstance(parsed, bool) or isinstance(value, bool):
        return
    if isinstance(parsed, int) and not isinstance(value, int):
        raise ConfigError(f"must be an integer, got {value!r}")
    if isinstance(parsed, float) and not isinstance(value, int | float):
        raise ConfigError(f"must be a number, got {value!r}")


def _unknown(key: str) -> ConfigError:
    near = difflib.get_close_matches(key.replace("-", "_"), [*serve_options(), *FLEET_KEYS], 1)
    hint = f"; did you mean {near[0]}?" if near else ""
    return ConfigError(
        f"unknown field (a worker takes name and any memorywall serve option by its long "
        f"name, '-' written '_'{hint})"
    )


def check(table: dict[str, Any], where: str, *, base: Path | None = None) -> dict[str, Any]:
    """A worker table's serve options (without `name`), each checked by serve's parser and the
    names it gives loaded. Raises ConfigError "{where}.{key}: ..." (or "{where}: ..." for
    the whole worker). Relative paths are taken from `base`."""
    known = serve_options()
    options = {k: v for k, v in table.items() if k not in FLEET_KEYS}
    for key in options:
        if key in REFUSED:
            raise ConfigError(f"{where}.{key}: set by the fleet: {REFUSED[key]}")
        if key not in known:
            raise ConfigError(f"{where}.{key}: {_unknown(key)}")
    required = [k for k, a in known.items() if a.required]
    for key in required:
        if key not in options:
            raise ConfigError(f"{where}.{key}: missing")
    for key, action in known.items():
        if key in options and action.type is Path and base is not None:
            path = Path(str(options[key]))
            options[key] = str(path if path.is_absolute() else base / path)
    base_argv: list[str] = []
    for key in required:
        try:
            base_argv += _option_argv(key, options[key])
        except ConfigError as e:
            raise ConfigError(f"{where}.{key}: {e}") from None
    for key, value in options.items():
        try:
            one = [] if key in required else _option_argv(key, value)
            parsed = getattr(parse_argv(base_argv + one), known[key].dest)
            _check_type(value, parsed)
        except ConfigError as e:
            raise ConfigError(f"{where}.{key}: {e}") from None
    args = parse_argv(to_argv({**FLEET_DEFAULTS, **options}))
    _check_names(args, where)
    return options


def _check_names(args: argparse.Namespace, where: str) -> None:
    """What serve loads by name (profiles, models, the link) is there, and what serve would
    run from the options builds (the deployment fits, the combination holds)."""
    from memorywall.cli.serve import configure
    from memorywall.cli.usage import UsageError

    names = [("hardware", load_hardware), ("model", load_model), ("draft_model", load_model)]
    for key, load in (*names, ("kv_link", parse_link)):
        try:
            if getattr(args, key) is not None:
                load(getattr(args, key))
        except MemorywallError as e:
            raise ConfigError(f"{where}.{key}: {e}") from None
    try:
        configure(args)
    except (MemorywallError, UsageError) as e:
        raise ConfigError(f"{where}: {e}") from None
