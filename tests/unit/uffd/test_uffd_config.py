"""The daemon's vm.unprivileged_userfaultfd switch (A.13 creation rules)."""

from __future__ import annotations

from vkernel.config import build_parser, config_from_args


def _cfg(argv: list[str], env: dict[str, str] | None = None) -> bool:
    args = build_parser().parse_args(["serve", *argv])
    return config_from_args(args, env or {}, False).unprivileged_userfaultfd


def test_unprivileged_userfaultfd_switch() -> None:
    assert not _cfg([])
    assert _cfg(["--unprivileged-userfaultfd"])
    assert _cfg([], {"VKERNEL_UNPRIVILEGED_USERFAULTFD": "1"})
    assert not _cfg(["--no-unprivileged-userfaultfd"], {"VKERNEL_UNPRIVILEGED_USERFAULTFD": "1"})
