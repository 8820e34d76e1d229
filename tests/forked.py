"""`surgery` commands each run in a process of its own, forked from one that has imported torch,
torchvision, timm and transformers already: a fresh `python -m surgery` spends 2-5 s of CPU on
those imports, and the documentation's examples run about fifty commands.

The fork is `python -m surgery` as a shell starts it, from the step after the imports: the
command's own stdin, stdout and stderr (passed over a Unix socket, so pipes and redirections are
the shell's), its arguments, its folder, `surgery.__main__` run as `-m` runs it, and the
interpreter's own exit (flushing, exit status, a traceback on an uncaught exception); the
client exits with that status, or dies of the same signal. What could tell the two apart is
refused: the server fails to start if an import prints anything (a fresh process would show it
to the user), and a command whose environment differs from the server's runs in a fresh
interpreter (the preloaded modules read theirs when imported). What stays different: those
modules are in `sys.modules` already (torch even for `inspect`, which never imports it), and
importing torch set TORCHINDUCTOR_CACHE_DIR in the environment.

    python tests/forked.py serve SOCKET          the server (its environment is the commands')
    python -I -S tests/forked.py SOCKET ARGS...  `surgery ARGS`, through the server
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

PRELOAD = ("torch", "torchvision", "timm", "transformers", "safetensors.torch")  # and every surgery module
SHELLS_OWN = {"_", "SHLVL", "PWD", "OLDPWD"}  # set by the shell for each command it starts
STARTED_IN = dict(os.environ)  # before the imports (importing torch sets TORCHINDUCTOR_CACHE_DIR)


@contextlib.contextmanager
def server(env: dict[str, str], cwd: Path) -> Iterator[str]:
    """A server for commands run in `env`; yields the command line that stands for `surgery`."""
    with tempfile.TemporaryDirectory() as folder:
        socket_path, errors = Path(folder) / "socket", Path(folder) / "stderr"
        with open(errors, "wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, __file__, "serve", str(socket_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=cwd,
                env=env,
            )
        try:
            ready = proc.stdout.readline()
            assert ready == b"ready\n" and not errors.read_bytes(), errors.read_text()  # an import spoke
            yield f"{sys.executable} -I -S {__file__} {socket_path}"
            assert not errors.read_bytes(), errors.read_text()
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()


def serve(path: str) -> list[str]:
    """Import PRELOAD, then fork a process for each request on `path`. Returns only in such a
    process, as the client asked it to be: its fds, folder, environment; its `surgery` arguments."""
    import importlib
    import pkgutil

    import surgery

    ours = [
        m.name for m in pkgutil.walk_packages(surgery.__path__, "surgery.") if m.name != "surgery.__main__"
    ]
    for name in (*PRELOAD, *ours):
        importlib.import_module(name)
    gc.collect()
    gc.freeze()  # else each fork's exit walks (and so copies) every object the imports made: 1.5 s
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:  # one watcher a request: it forks the command and reports how it ended
            listener.close()
            return _watch(conn)
        conn.close()
        while _reap():
            pass


def _reap() -> bool:
    try:
        return os.waitpid(-1, os.WNOHANG)[0] != 0
    except ChildProcessError:
        return False


def _watch(conn: socket.socket) -> list[str]:
    message, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while more := conn.recv(1 << 16):  # the rest of the request, to the client's end of writing
        message += more
    request = json.loads(message)
    pid = os.fork()
    if pid == 0:
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        env = request["env"]
        if _without_shells(env) != _without_shells(STARTED_IN):
            python = sys.executable
            os.execve(python, [python, "-m", "surgery", *request["argv"]], env)
        for name in SHELLS_OWN:
            os.environ.pop(name, None)
        os.environ.update({name: env[name] for name in SHELLS_OWN if name in env})
        return request["argv"]
    for fd in fds:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    conn.sendall(str(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)).encode())
    os._exit(0)


def _without_shells(env) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in SHELLS_OWN}


def client(path: str, argv: list[str]) -> int:
    """Ask the server at `path` to run `surgery ARGV` with this process's fds; its exit status."""
    conn = socket.socket(socket.AF_UNIX)
    conn.connect(path)
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
    conn.shutdown(socket.SHUT_WR)
    status = int(conn.recv(64) or b"-9")  # nothing: the watcher itself died
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    return status


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        argv = serve(sys.argv[2])
        # A forked command: run as `python -m surgery ARGV` in its folder would be.
        import importlib
        import runpy

        sys.argv = [sys.argv[0], *argv]
        sys.path[0] = os.getcwd()
        importlib.invalidate_caches()
        runpy.run_module("surgery", run_name="__main__", alter_sys=True)
    else:
        sys.exit(client(sys.argv[1], sys.argv[2:]))
