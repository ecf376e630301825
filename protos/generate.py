"""Generate the Python code for the protos this project serves (committed beside them).

memorywall.v1 (`protos/memorywall/v1`, ours) and KServe v2 / Triton's
`inference` package (`protos/kserve`, vendored from triton-inference-server/common).

python protos/generate.py          # regenerate
python protos/generate.py --check  # fail if the committed code is stale (a test runs this)
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ProtoSet:
    """Protos compiled with `include` as their root; `package` is the Python package of the
    generated modules, when their proto import paths are not one already."""

    include: Path
    protos: tuple[str, ...]
    package: str | None = None

    @property
    def generated(self) -> tuple[str, ...]:
        stems = [p.removesuffix(".proto") for p in self.protos]
        return tuple(f"{s}{suffix}" for s in stems for suffix in ("_pb2.py", "_pb2.pyi"))

    @property
    def generated_grpc(self) -> tuple[str, ...]:
        return tuple(f"{p.removesuffix('.proto')}_pb2_grpc.py" for p in self.protos)


PROTO_SETS = (
    ProtoSet(ROOT, ("memorywall/v1/engine.proto",)),
    # Triton's files import each other by bare name ("model_config.proto"), and that is the
    # name tritonclient registers them under too: kept, so both load in one process.
    ProtoSet(ROOT / "kserve", ("grpc_service.proto", "model_config.proto"), "memorywall.kserve"),
)


def _fix_imports(text: str, package: str, stems: list[str]) -> str:
    """protoc writes `import model_config_pb2`: make such imports name their package."""
    for stem in stems:
        text = re.sub(
            rf"^import {stem}_pb2 as (\w+)$",
            rf"from {package} import {stem}_pb2 as \1",
            text,
            flags=re.MULTILINE,
        )
    return text


def generate_set(proto_set: ProtoSet, out: Path) -> None:
    proto_include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{proto_set.include}",
        f"-I{proto_include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(proto_set.include / p) for p in proto_set.protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    if proto_set.package is not None:
        stems = [p.removesuffix(".proto") for p in proto_set.protos]
        for name in (*proto_set.generated, *proto_set.generated_grpc):
            path = out / name
            path.write_text(_fix_imports(path.read_text(), proto_set.package, stems))
    # Services with no RPCs get no _grpc module worth keeping.
    for name in proto_set.generated_grpc:
        path = out / name
        if path.exists() and "Stub" not in path.read_text():
            path.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if not args.check:
        for proto_set in PROTO_SETS:
            generate_set(proto_set, proto_set.include)
        return 0
    stale: list[str] = []
    for proto_set in PROTO_SETS:
        with tempfile.TemporaryDirectory() as tmp:
            generate_set(proto_set, Path(tmp))
            for new in sorted(Path(tmp).rglob("*_pb2*.py*")):
                old = proto_set.include / new.relative_to(tmp)
                if not old.exists() or new.read_text() != old.read_text():
                    stale.append(old.relative_to(ROOT).as_posix())
    if stale:
        print(
            f"stale generated code: {', '.join(stale)}; run python protos/generate.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
