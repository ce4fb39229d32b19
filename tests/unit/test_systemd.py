"""multiproxy.systemd: the notification datagrams and the NOTIFY_SOCKET addresses, on a real AF_UNIX socket."""
import socket

import pytest

from multiproxy import systemd


def test_message_is_one_field_per_line():
    assert systemd.message("READY=1") == b"READY=1"
    assert systemd.message("READY=1", STATUS="serving 2 listeners") == b"READY=1\nSTATUS=serving 2 listeners"
    assert systemd.message("RELOADING=1", MONOTONIC_USEC=12) == b"RELOADING=1\nMONOTONIC_USEC=12"


def test_a_value_with_a_newline_is_refused():
    with pytest.raises(ValueError, match="STATUS"):
        systemd.message("READY=1", STATUS="two\nlines")


def test_notify_address_forms():
    assert systemd.notify_address(None) is None
    assert systemd.notify_address("") is None
    assert systemd.notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert systemd.notify_address("@sd-notify") == b"\0sd-notify"
    assert systemd.notify_address("vsock:2:1234") is None     # not AF_UNIX: ignored


def test_without_notify_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.ready() is False


def test_ready_reloading_stopping_reach_the_socket(monkeypatch, tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert systemd.ready("up")
        assert sock.recv(512) == b"READY=1\nSTATUS=up"
        assert systemd.reloading()
        fields = dict(line.split("=") for line in sock.recv(512).decode().splitlines())
        assert fields["RELOADING"] == "1" and int(fields["MONOTONIC_USEC"]) > 0
        assert systemd.stopping()
        assert sock.recv(512) == b"STOPPING=1\nSTATUS=draining clients"


def test_a_manager_that_is_gone_does_not_stop_the_proxy(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.ready() is False
