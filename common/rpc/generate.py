"""Regenerate the gRPC stubs in this package from proto/federation.proto (`make proto`).

grpc_tools writes `import federation_pb2`; we rewrite it to a package-relative import so the
stubs work as `fedpers.rpc.*`. A test regenerates into a temp dir and compares bytes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
PROTO_NAME = "federation.proto"
OUT_DIR = Path(__file__).resolve().parent
GENERATED = ("federation_pb2.py", "federation_pb2.pyi", "federation_pb2_grpc.py")

_ABS_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


class GenerateError(RuntimeError):
    """protoc failed; the message carries its exit status."""


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Run protoc for federation.proto into `out_dir`; return the generated file paths."""
    import grpc_tools
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / PROTO_NAME),
    ]
    status = protoc.main(args)
    if status != 0:
        raise GenerateError(f"protoc exited with status {status} for {PROTO_DIR / PROTO_NAME}")
    grpc_file = out_dir / "federation_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(_ABS_IMPORT.sub(r"from . import \1 as \2", text))
    return [out_dir / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default: common/rpc)")
    ns = parser.parse_args(argv)
    for path in generate(ns.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
