"""Regenerate vkernel/v1 from protos/vkernel/v1 (make proto), or check for drift (--check)."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_PKG = ROOT / "vkernel" / "v1"
INIT = '"""Generated protobuf and gRPC code for the vkernel.v1 API (make proto). Do not edit."""\n'


def generate(out_root: Path) -> None:
    protos = sorted(
        str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "vkernel" / "v1").glob("*.proto")
    )
    bindir = Path(sys.executable).parent
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_DIR)
    (out_root / "vkernel" / "v1" / "__init__.py").write_text(INIT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "vkernel" / "v1").mkdir(parents=True)
        generate(out)
        fresh = out / "vkernel" / "v1"
        names = sorted(p.name for p in fresh.iterdir() if p.is_file())
        if args.check:
            committed = (
                sorted(p.name for p in OUT_PKG.glob("*") if p.is_file()) if OUT_PKG.exists() else []
            )
            _, mismatch, errors = filecmp.cmpfiles(fresh, OUT_PKG, names, shallow=False)
            stale = mismatch + errors + sorted(set(committed) - set(names))
            if stale:
                print(
                    "generated protobuf code is stale (run `make proto`):", *stale, file=sys.stderr
                )
                return 1
            print(f"protobuf code up to date ({len(names)} files)")
            return 0
        if OUT_PKG.exists():
            shutil.rmtree(OUT_PKG)
        shutil.copytree(fresh, OUT_PKG)
        print(f"generated {len(names)} files into {OUT_PKG.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
