"""The preload server (zygote): imports the worker's heavy modules once, then forks a worker per run.

``python -m vqabench.engine.preload FD MODULE``, started once per session by the runner
(vqabench/preload_launcher.py), in its own session, with FD a listening Unix socket.
Importing torch, transformers and the embedded model's family takes ~6 s per process; a worker forked
from this process starts with them imported.
The server imports them (for the real worker) and MODULE but runs no torch op, so no
OpenMP/intra-op thread pool and no CUDA context exist when it forks: each child initialises
its own, under its own ``CUDA_VISIBLE_DEVICES``.

Protocol, one JSON line per message on a Unix stream socket, with the launcher:

1. the launcher sends ``{"argv", "env", "cwd"}`` with its stdin/stdout/stderr (SCM_RIGHTS);
2. the server answers ``{"ready": true}`` or ``{"decline": "<one sentence>"}`` (another
   Python thread is alive, or the environment differs from the one the server started
   with in more than the CUDA device keys: modules read some variables at import);
3. the launcher answers ``{"go": true}``; the server forks; the child starts a session of
   its own, takes the three descriptors as 0/1/2, the environment and cwd, default signal
   handlers and ``PR_SET_PDEATHSIG`` (it dies with the server), and runs MODULE as
   ``python -m MODULE argv...`` would; the server sends ``{"pid": N}``;
4. the launcher may send ``{"signal": N}`` (forwarded to the child's process group);
   the server sends ``{"exit": CODE}`` (negative: killed by that signal) once the child
   is reaped, and SIGKILLs what is left of the child's group, as the runner does.

If a launcher's connection closes before its child exits (the launcher was SIGKILLed), the
child's group is SIGKILLed: no worker outlives its launcher. On SIGTERM (the runner is
done) the server exits at once, killing any child. When its stdin reaches end of file (the
runner died without stopping it) it accepts no more launchers and exits once its children
have: as without the server, a worker whose host was SIGKILLed runs to its end.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import sys
import threading
import traceback
import warnings

from vqabench.models import registry

#: What the real worker imports before it trains; a test worker module gets only itself.
HEAVY_MODULES = ("torch", "transformers", "vqabench.engine.run")
REAL_WORKER = "vqabench.engine.worker"
#: Environment keys a run may set differently from the server's (read only when CUDA starts).
PER_RUN_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"})
PR_SET_PDEATHSIG = 1
MAX_MESSAGE = 4 * 2**20


def send(conn: socket.socket, message: dict[str, object]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


class Connection:
    """One launcher: its socket, the lines read so far and, once forked, its child's pid."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.child: int | None = None

    def read_messages(self) -> list[dict[str, object]] | None:
        """The complete messages now readable; None at end of file."""
        try:
            data = self.sock.recv(65536)
        except OSError:
            return None
        if not data:
            return None
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        messages = []
        for line in lines:
            with contextlib.suppress(ValueError):
                messages.append(json.loads(line))
        return messages


class Server:
    """Accepts launchers, forks their workers, forwards signals and reports exit codes."""

    def __init__(self, listener: socket.socket, module: str, started_env: dict[str, str]) -> None:
        self.listener = listener
        self.module = module
        #: the environment before the imports, and what they added (torch sets TORCHINDUCTOR_CACHE_DIR)
        self.started_env = started_env
        self.import_env = {k: v for k, v in os.environ.items() if started_env.get(k) != v}
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, Connection] = {}
        self.wake_read, self.wake_write = socket.socketpair()
        self.stopping = False
        self.draining = False  # no new launchers; exit once every child has

    def serve(self) -> None:
        for sock in (self.wake_read, self.wake_write):
            sock.setblocking(False)
        signal.set_wakeup_fd(self.wake_write.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._stop)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_read, selectors.EVENT_READ, "wake")
        self.selector.register(sys.stdin, selectors.EVENT_READ, "stdin")
        try:
            while not (self.stopping or (self.draining and not self.children)):
                for key, _ in self.selector.select():
                    self._handle(key)
                self._reap()
        finally:
            for pid in self.children:
                _kill_group(pid, signal.SIGKILL)

    def _stop(self, *_: object) -> None:
        self.stopping = True

    def _handle(self, key: selectors.SelectorKey) -> None:
        if key.data == "accept":
            sock, _ = self.listener.accept()
            self._start(sock)
        elif key.data == "wake":
            with contextlib.suppress(BlockingIOError):
                self.wake_read.recv(4096)
        elif key.data == "stdin":
            if not os.read(sys.stdin.fileno(), 4096):
                self.draining = True
                self.selector.unregister(self.listener)
                self.selector.unregister(sys.stdin)
        else:
            self._from_launcher(key.data)

    def _start(self, sock: socket.socket) -> None:
        """Steps 1 to 3 of the protocol for a new launcher (it answers at once, so reads block briefly)."""
        sock.settimeout(10)
        fds: list[int] = []
        try:
            line, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 3)
            request = json.loads(line)
            reason = self._decline_reason(request, fds)
            if reason:
                send(sock, {"decline": reason})
                return
            send(sock, {"ready": True})
            if not json.loads(sock.recv(64) or b"{}").get("go"):
                return
            pid = os.fork()
            if pid == 0:
                self._child(request, fds, sock)
            conn = Connection(sock)
            conn.child = pid
            self.children[pid] = conn
            sock.settimeout(None)
            self.selector.register(sock, selectors.EVENT_READ, conn)
            send(sock, {"pid": pid})
        except (OSError, ValueError) as exc:
            print(f"vqabench preload: a launcher's request failed: {exc}", file=sys.stderr)
        finally:
            for fd in fds:
                os.close(fd)
            if not any(conn.sock is sock for conn in self.children.values()):
                sock.close()

    def _decline_reason(self, request: dict[str, object], fds: list[int]) -> str:
        if len(fds) != 3:
            return f"the preload server got {len(fds)} file descriptors instead of 3."
        if threading.active_count() != 1:
            return f"the preload server has {threading.active_count()} Python threads, so it cannot fork safely."
        env = request.get("env")
        if not isinstance(env, dict):
            return "the preload server got a request without an environment."
        base = self.started_env
        differing = sorted(k for k in set(env) ^ set(base) | {k for k in env if env[k] != base.get(k)})
        differing = [k for k in differing if k not in PER_RUN_ENV]
        if differing:
            return f"the run's environment differs from the preload server's in {', '.join(differing[:5])}."
        return ""

    def _child(self, request: dict[str, object], fds: list[int], sock: socket.socket) -> None:
        """In the forked child: become the worker described by `request`, then exit with its code."""
        code = 1
        try:
            os.setsid()
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() == 1:  # the server died before the line above took effect
                os._exit(1)
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGTERM):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.selector.close()
            for other in (self.listener, self.wake_read, self.wake_write, sock):
                other.close()
            for conn in self.children.values():
                conn.sock.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            env = request["env"]
            assert isinstance(env, dict)
            os.environ.clear()
            os.environ.update({**self.import_env, **env})
            os.chdir(str(request["cwd"]))
            argv = request["argv"]
            assert isinstance(argv, list)
            sys.argv = [self.module, *map(str, argv)]
            # The server imported the worker module to warm its imports; runpy then warns that it is
            # already in sys.modules, a line every run's log would show. Running it as __main__ from
            # that warm state is what the server is for, so the warning says nothing here.
            warnings.filterwarnings(
                "ignore", message=r".*found in sys\.modules after import of package", category=RuntimeWarning
            )
            try:
                runpy.run_module(self.module, run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

    def _from_launcher(self, conn: Connection) -> None:
        messages = conn.read_messages()
        if messages is None:  # the launcher is gone: its worker must not outlive it
            if conn.child is not None:
                _kill_group(conn.child, signal.SIGKILL)
            self.selector.unregister(conn.sock)
            return
        for message in messages:
            signum = message.get("signal")
            if isinstance(signum, int) and conn.child is not None:
                _kill_group(conn.child, signum)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            _kill_group(pid, signal.SIGKILL)  # what the worker left behind, as the runner does
            if conn is None:
                continue
            with contextlib.suppress(OSError):
                send(conn.sock, {"exit": os.waitstatus_to_exitcode(status)})
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn.sock)
            conn.sock.close()


def _kill_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[0].isdigit():
        print("usage: python -m vqabench.engine.preload FD MODULE", file=sys.stderr)
        return 2
    listener = socket.socket(fileno=int(argv[0]))  # bound by the runner: launchers queue while we import
    module = argv[1]
    started_env = dict(os.environ)
    heavy = (*HEAVY_MODULES, *registry.preloaded_modules()) if module == REAL_WORKER else ()
    for name in (*heavy, module):
        importlib.import_module(name)
    sys.stdout.flush()
    Server(listener, module, started_env).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
