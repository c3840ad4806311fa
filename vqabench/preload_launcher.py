"""Host side of the preload server (vqabench/engine/preload.py): start it, and launch runs through it.

The runner still starts one subprocess per run, exactly as without it; only the command
changes: ``python -m vqabench.preload_launcher SOCKET MODULE ARGS...`` instead of
``python -m MODULE ARGS...``. This launcher (stdlib only: it must start fast and never
import torch) hands its stdin/stdout/stderr, argv, environment and cwd to the server,
which forks a worker that already has torch, transformers and the embedded model imported, saving ~6 s
per run. The launcher then stands for the worker: SIGTERM/SIGINT sent to it are forwarded
to the worker's process group, and it exits with the worker's code, or dies of the same
signal. If it is SIGKILLed, the server kills the worker. If the server cannot be reached
within :data:`READY_TIMEOUT` s (the first launcher of a session waits for its imports), or
declines, the launcher says so in one sentence on stderr and execs ``python -m MODULE
ARGS...``: a run never fails because of the server.

:class:`PreloadServer` is the runner's handle: it starts the server on first need, in a
session of its own, with a socket in a private temporary folder, and stops it when the
session ends; the server also exits when the runner dies (its stdin closes). It is used
on Linux, for a worker command of the form ``python -m MODULE ...`` run by this
interpreter, for single-process runs (torchrun runs keep their command), unless
``VQABENCH_PRELOAD=0``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence

PRELOAD_ENV = "VQABENCH_PRELOAD"
#: Longest wait for the server's answer: its imports take ~6 s on an idle machine.
READY_TIMEOUT = 60.0


def preload_module(worker_cmd: Sequence[str], env: Mapping[str, str]) -> str | None:
    """The module a preload server can run for `worker_cmd`, or None when it must start as it is."""
    if not sys.platform.startswith("linux") or env.get(PRELOAD_ENV, "1") == "0":
        return None
    if len(worker_cmd) >= 3 and worker_cmd[0] == sys.executable and worker_cmd[1] == "-m":
        return worker_cmd[2]
    return None


class PreloadServer:
    """One preload server per runner session, started on first need and stopped by :meth:`close`."""

    def __init__(self, module: str, env: Mapping[str, str]) -> None:
        self.module = module
        self.env = dict(env)
        self.folder: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def command(self, worker_cmd: Sequence[str]) -> list[str]:
        """`worker_cmd` (``python -m MODULE ARGS...``) as a launcher command; starts the server if needed."""
        if self.folder is None:  # the first run starts the server, once
            self.folder = tempfile.mkdtemp(prefix="vqabench-preload-")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
                listener.bind(os.path.join(self.folder, "socket"))  # here, so launchers never find it missing
                listener.listen(64)
                with contextlib.suppress(OSError):  # if it fails, launchers find no server: they start workers
                    self.process = subprocess.Popen(
                        [sys.executable, "-m", "vqabench.engine.preload", str(listener.fileno()), self.module],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        env=self.env,
                        start_new_session=True,
                        pass_fds=[listener.fileno()],
                    )
        assert self.folder is not None
        return [sys.executable, "-m", "vqabench.preload_launcher", os.path.join(self.folder, "socket"), *worker_cmd[2:]]

    def close(self) -> None:
        """Stop the server (its workers have ended by now) and remove its socket's folder."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            if self.process.stdin is not None:
                self.process.stdin.close()
            self.process = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


class Unavailable(Exception):
    """The server cannot run this worker; the message is the sentence the launcher prints."""


def _read_message(sock: socket.socket, buffer: bytearray) -> dict[str, object]:
    while b"\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise EOFError
        buffer += data
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    message = json.loads(line)
    assert isinstance(message, dict)
    return message


def _start_worker(socket_path: str, args: list[str], buffer: bytearray) -> tuple[socket.socket, int]:
    """Steps 1 to 3 of the protocol (see the server's docstring): the connection and the worker's pid."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(socket_path)  # queued until the server has imported everything
        except OSError as exc:
            raise Unavailable(f"the preload server at {socket_path} cannot be reached ({exc.strerror})") from None
        request = {"argv": args, "env": dict(os.environ), "cwd": os.getcwd()}
        socket.send_fds(sock, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        sock.settimeout(READY_TIMEOUT)
        try:
            answer = _read_message(sock, buffer)
        except TimeoutError:
            raise Unavailable(f"the preload server did not answer within {READY_TIMEOUT:.0f} s") from None
        if "decline" in answer:
            raise Unavailable(str(answer["decline"]).rstrip("."))
        sock.settimeout(10)
        sock.sendall(b'{"go": true}\n')
        started = _read_message(sock, buffer)
        pid = started.get("pid")
        if not isinstance(pid, int):
            raise Unavailable(f"the preload server answered {started!r} instead of a pid")
        sock.settimeout(None)
        return sock, pid
    except (OSError, EOFError, ValueError) as exc:
        sock.close()
        raise Unavailable(f"the preload server failed ({exc or type(exc).__name__})") from None
    except Unavailable:
        sock.close()
        raise


def main(argv: list[str]) -> int:
    """Run ``MODULE ARGS...`` (argv = SOCKET MODULE ARGS...) through the server, or directly."""
    socket_path, module, *args = argv
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # until a worker exists, a signal just ends the launcher
    buffer = bytearray()
    try:
        sock, _pid = _start_worker(socket_path, args, buffer)
    except Unavailable as exc:
        print(f"vqabench: {exc}; starting the worker without it.", file=sys.stderr, flush=True)
        os.execv(sys.executable, [sys.executable, "-m", module, *args])

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(json.dumps({"signal": signum}).encode() + b"\n")

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    try:
        code = _read_message(sock, buffer).get("exit")
    except (OSError, EOFError, ValueError):
        code = None
    if not isinstance(code, int):
        print("vqabench: the preload server stopped during the run, and the worker with it.", file=sys.stderr)
        return 1
    if code < 0:  # die of the worker's signal, so the runner sees the same return code
        if -code != signal.SIGKILL:
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code  # a signal whose default is not to end a process
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
