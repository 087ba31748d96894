#!/usr/bin/env python3
"""Regenerate gptjt_proto/*_pb2*.py from proto/gptjt_proto/*.proto (run after editing a .proto).

Usage: python proto/generate.py [--out DIR]   (default: the repository root)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "gptjt_proto").glob("*.proto"))
    (out / "gptjt_proto").mkdir(parents=True, exist_ok=True)
    # -I proto makes the generated modules import each other as `gptjt_proto.X_pb2`.
    code = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={out}",
                        f"--grpc_python_out={out}", f"--pyi_out={out}", *sources])
    if code != 0:
        sys.exit(f"protoc failed with exit code {code}")
    return sorted((out / "gptjt_proto").glob("*_pb2*.py*"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT)
    for path in generate(ap.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
