"""The committed generated code matches protos/ (make proto regenerates it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh() -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr


def test_every_proto_element_is_commented() -> None:
    """buf's COMMENTS rule, checked without the buf binary: a // line above each element."""
    for proto in sorted((ROOT / "protos" / "vkernel" / "v1").glob("*.proto")):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            starts = ("message ", "enum ", "service ", "rpc ")
            is_field = (
                stripped.endswith(";")
                and "=" in stripped
                and not stripped.startswith(("syntax", "option", "package", "//"))
            )
            if stripped.startswith(starts) or is_field:
                above = lines[i - 1].strip() if i else ""
                assert above.startswith("//"), f"{proto.name}:{i + 1}: {stripped}"
