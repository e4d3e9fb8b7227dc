"""How the suite finds its servers: the Docker probe closes its sockets, answers or not."""

from __future__ import annotations

import gc
import socket
import threading
from pathlib import Path

import pytest

from tests.conftest import _docker_answers


def serve_once(path: Path, answer: bytes) -> threading.Thread:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def reply() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(answer)

    thread = threading.Thread(target=reply)
    thread.start()
    return thread


def test_docker_probe_without_an_engine_leaks_no_socket(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Warnings are errors in this suite: an unclosed socket collected here fails the test.
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'missing.sock'}")
    assert "does not exist" in (_docker_answers() or "")
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:1")
    assert "Connection refused" in (_docker_answers() or "")
    gc.collect()


@pytest.mark.parametrize(
    ("answer", "ok"),
    [(b"HTTP/1.1 200 OK\r\n\r\nOK", True), (b"HTTP/1.1 404 Not Found\r\n\r\n", False)],
)
def test_docker_probe_reads_the_ping_answer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, answer: bytes, ok: bool
) -> None:
    path = tmp_path / "docker.sock"
    thread = serve_once(path, answer)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    reason = _docker_answers()
    thread.join()
    assert (reason is None) == ok, reason
    gc.collect()
