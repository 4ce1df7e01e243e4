"""`vkernel serve` options: flags, VKERNEL_* environment, defaults, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from vkernel.config import Listen, ServeConfig, build_parser, config_from_args, parse_size


def cfg(argv: list[str], env: dict[str, str] | None = None, tty: bool = False) -> ServeConfig:
    return config_from_args(build_parser().parse_args(["serve", *argv]), env or {}, tty)


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("64K", 64 << 10), ("512m", 512 << 20), ("1G", 1 << 30), ("2GiB", 2 << 30)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "1.5G", "-1G", "12Q", "G"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_defaults() -> None:
    c = cfg([])
    assert c.memory_bytes == 1 << 30
    assert c.arch == "x86_64"
    assert c.log_format == "json"  # stdout is not a TTY
    assert c.grace == 5.0
    assert next(str(x) for x in c.listen).endswith("/vkernel.sock")
    assert cfg([], tty=True).log_format == "console"


def test_flags_beat_environment() -> None:
    env = {"VKERNEL_MEMORY": "256M", "VKERNEL_ARCH": "arm64", "VKERNEL_GRACE": "3"}
    c = cfg(["--memory", "512M"], env)
    assert (c.memory_bytes, c.arch, c.grace) == (512 << 20, "arm64", 3.0)


def test_listen_repeatable_and_env_list(tmp_path: Path) -> None:
    token = tmp_path / "t"
    token.write_text("abc\n")
    c = cfg(
        [
            "--listen",
            "unix:///run/a.sock",
            "--listen",
            "tcp://0.0.0.0:50051",
            "--token-file",
            str(token),
        ]
    )
    assert c.listen == (Listen("unix", "/run/a.sock"), Listen("tcp", "0.0.0.0:50051"))
    assert c.token == "abc"
    env = {"VKERNEL_LISTEN": "unix:///x.sock, unix:///y.sock"}
    assert [str(x) for x in cfg([], env).listen] == ["unix:///x.sock", "unix:///y.sock"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "tcp://127.0.0.1:1"], "requires --token-file"),
        (["--listen", "unix://relative.sock"], "absolute"),
        (["--listen", "http://x"], "unix:///path or tcp://host:port"),
        (["--listen", "tcp://host:99999", "--token-file", "/dev/null"], "tcp://host:port"),
        (["--memory", "1000"], "multiple of 4 KiB"),
        (["--memory", "1G", "--movable", "2G"], "smaller than --memory"),
        (["--token-file", "/nonexistent/token"], "cannot read token file"),
        (["--grace", "-1"], "--grace"),
    ],
)
def test_refusals(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cfg(argv)


def test_empty_token_file_refused(tmp_path: Path) -> None:
    token = tmp_path / "t"
    token.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        cfg(["--token-file", str(token)])


def test_dio_switches_flags_env_defaults() -> None:
    """--dio-gup / --dio-foll (VKERNEL_DIO_GUP / VKERNEL_DIO_FOLL): flags beat the environment."""
    c = cfg([])
    assert (c.dio_gup, c.dio_foll) == ("fast", "pin")
    env = {"VKERNEL_DIO_GUP": "slow", "VKERNEL_DIO_FOLL": "get"}
    c = cfg([], env)
    assert (c.dio_gup, c.dio_foll) == ("slow", "get")
    c = cfg(["--dio-gup", "fast", "--dio-foll", "pin"], env)
    assert (c.dio_gup, c.dio_foll) == ("fast", "pin")
    with pytest.raises(ValueError, match="GUP mode 'medium'"):
        cfg([], {"VKERNEL_DIO_GUP": "medium"})
    with pytest.raises(ValueError, match="FOLL mode 'borrow'"):
        cfg([], {"VKERNEL_DIO_FOLL": "borrow"})
    with pytest.raises(SystemExit):  # argparse refuses a bad choice on the command line
        cfg(["--dio-foll", "borrow"])
