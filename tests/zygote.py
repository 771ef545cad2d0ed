"""A Python that has imported detr once and runs each `python -m detr ARGS` the tests ask for in a
forked copy of itself: a command then starts in milliseconds instead of the seconds importing
torch takes (the suite runs a hundred such commands). Started by `tests/conftest.py`'s `detr_cli`.

Each request (pickled over the socket whose fd is its argument: args, env, cwd, and the paths of
the files for stdin, stdout and stderr) is run in a child that takes that environment, folder and
those files, runs `detr` as `python -m detr` would (its `__main__`, `SystemExit` for the exit status, an
uncaught exception printed as Python prints it, status 1) and ends with `os._exit`. The zygote
answers with the child's pid, then with its exit status (negative: killed by that signal).
No thread runs here before a fork: importing torch starts none.
"""

from __future__ import annotations

import os
import pickle
import runpy
import socket
import struct
import sys
import traceback


def send(sock: socket.socket, obj: object) -> None:
    data = pickle.dumps(obj)
    sock.sendall(struct.pack("!I", len(data)) + data)


def receive(sock: socket.socket) -> object | None:
    header = sock.recv(4, socket.MSG_WAITALL)
    if len(header) < 4:
        return None
    (size,) = struct.unpack("!I", header)
    return pickle.loads(sock.recv(size, socket.MSG_WAITALL))


def run_child(request: dict) -> int:
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, flags in ((0, request["stdin"], os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                            (2, request["stderr"], os.O_WRONLY)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = [os.path.join(os.path.dirname(sys.modules["detr"].__file__), "__main__.py"), *request["args"]]
    try:
        runpy.run_module("detr", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        if done.code is None or isinstance(done.code, int):
            code = done.code or 0
        else:
            print(done.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - what Python prints for an uncaught exception, and its status
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a full device or a closed pipe: the command has said its piece
            pass
    return code


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    import detr.cli  # noqa: F401 - what `python -m detr` imports before it parses its arguments

    while (request := receive(sock)) is not None:
        pid = os.fork()
        if pid == 0:
            sock.close()
            os._exit(run_child(request))
        send(sock, pid)
        _, status = os.waitpid(pid, 0)
        send(sock, os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
