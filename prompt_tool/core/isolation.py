"""The isolated renderer: renders in worker processes with hard CPU and memory limits.

The in-process budgets (:mod:`prompt_tool.core.limits`) are checks the sandbox makes; a single
C-level operation nobody thought of can still run past them. For deployments whose template
authors are not trusted, ``PROMPT_TOOL_RENDER_ISOLATION=process`` renders every template in
one of a small pool of worker processes instead. Each worker:

- sets ``RLIMIT_AS`` (address space) on itself at start, and before each render re-arms
  ``RLIMIT_CPU`` to its CPU time so far plus the render's budget, so a runaway render is
  killed by the kernel (``SIGXCPU``) even if the parent is gone;
- renders with the same :meth:`TemplateEngine.render` path as in-process rendering, so the
  text and the errors (class and message) are the same;
- asks the parent for the source of every included/imported template when the render needs
  it (the parent calls the loader it was given), so includes behave as in-process.

The parent waits for each render at most ``timeout_s`` plus a margin. On overrun it kills the
worker, starts a fresh one and raises :class:`TemplateLimitError`; a worker that dies (memory
or CPU limit) is replaced too and the render fails with a one-line limit error.

Protocol: one JSON object per line on the worker's stdin and stdout. Python's ``json`` escapes
lone surrogates, big integers and non-finite floats and reads them back unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from prompt_tool.core import errors as _errors
from prompt_tool.core.errors import TemplateError, TemplateLimitError, TemplateRenderError
from prompt_tool.core.limits import RenderLimits

__all__ = ["DEADLINE_MARGIN_S", "IsolatedRenderer"]

#: Added to a render's ``timeout_s`` before the parent stops the worker: the in-process checks
#: get the first chance to fail the render with their more precise message.
DEADLINE_MARGIN_S: Final = 0.5
#: How long a new worker may take to start (import Python, Jinja and the sandbox).
STARTUP_TIMEOUT_S: Final = 30.0

_ERROR_CLASSES: Final[dict[str, type[TemplateError]]] = {
    name: cls
    for name in _errors.__all__
    if isinstance(cls := getattr(_errors, name), type) and issubclass(cls, TemplateError)
}

_KILLED_HINT = "make the template do less work, or raise the limit if the work is legitimate"


class _WorkerGoneError(Exception):
    """The worker closed its pipe or died."""


class _Worker:
    """One worker process and the read buffer of its stdout."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "prompt_tool.core.isolation", json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        self._buffer = b""
        ready = self.receive(time.monotonic() + STARTUP_TIMEOUT_S)
        if ready is None or ready.get("ready") is not True:
            self.kill()
            raise TemplateRenderError(
                "the isolated renderer's worker process did not start",
                hint="check that the Python environment can import prompt_tool, "
                "or set PROMPT_TOOL_RENDER_ISOLATION=in-process",
            )

    def send(self, message: Mapping[str, Any]) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps(message).encode("ascii") + b"\n")
            stdin.flush()
        except OSError as exc:  # BrokenPipeError: the worker died
            raise _WorkerGoneError from exc

    def receive(self, deadline: float) -> dict[str, Any] | None:
        """The next message, or ``None`` if the deadline passed first."""
        stdout = self.process.stdout
        assert stdout is not None
        fd = stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], left)
            if not readable:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise _WorkerGoneError
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.process.wait()


class IsolatedRenderer:
    """A pool of worker processes that render templates under hard OS limits.

    Thread-safe: each render takes an idle worker (starting one if fewer than ``workers``
    exist, waiting otherwise) and gives it back, or replaces it if it had to be stopped.
    """

    def __init__(
        self,
        *,
        workers: int = 2,
        memory_bytes: int = 512 * 1024 * 1024,
        engine_settings: Mapping[str, Any] | None = None,
        deadline_margin_s: float = DEADLINE_MARGIN_S,
    ) -> None:
        if workers < 1:
            raise ValueError("an isolated renderer needs at least one worker")
        self.workers = workers
        self.memory_bytes = memory_bytes
        self.deadline_margin_s = deadline_margin_s
        self._config = {"memory_bytes": memory_bytes, "settings": dict(engine_settings or {})}
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._started = 0
        self._lock = threading.Lock()
        self._closed = False
        #: Workers replaced after an overrun or a crash (for tests and monitoring).
        self.replaced = 0

    def _take(self) -> _Worker:
        while True:
            worker = self._take_any()
            if worker.alive():
                return worker
            self._discard(worker)  # died while idle: start another

    def _take_any(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise TemplateRenderError("the isolated renderer is closed")
            try:
                return self._idle.get_nowait()
            except queue.Empty:
                if self._started < self.workers:
                    self._started += 1
                    start = True
                else:
                    start = False
        if start:
            try:
                return _Worker(self._config)
            except BaseException:
                with self._lock:
                    self._started -= 1
                raise
        return self._idle.get()

    def _give_back(self, worker: _Worker) -> None:
        self._idle.put(worker)

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._started -= 1
            self.replaced += 1

    def idle_pids(self) -> list[int]:
        """Process ids of the idle workers, the next one to be used first."""
        with self._lock:
            return [worker.process.pid for worker in reversed(self._idle.queue)]

    def close(self) -> None:
        """Stop every idle worker; renders still running finish on theirs."""
        with self._lock:
            self._closed = True
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                return
            worker.kill()

    def render(
        self,
        source: str,
        variables: Mapping[str, object],
        *,
        name: str,
        version: int | str | None,
        limits: RenderLimits,
        loader: Callable[[str], str | None] | None,
    ) -> str:
        """Render in a worker; raise what the in-process render would, or a limit error."""
        worker = self._take()
        settled = False
        deadline = time.monotonic() + limits.timeout_s + self.deadline_margin_s
        try:
            worker.send(
                {
                    "source": source,
                    "variables": dict(variables),
                    "name": name,
                    "version": version,
                    "limits": dataclasses.asdict(limits),
                    "has_loader": loader is not None,
                }
            )
            while True:
                message = worker.receive(deadline)
                if message is None:
                    self._discard(worker)
                    settled = True
                    raise TemplateLimitError(
                        f"the render ran past its deadline ({limits.timeout_s:g} s) "
                        "and its process was stopped",
                        template=name,
                        version=version,
                        hint=_KILLED_HINT,
                    )
                if "load" in message:
                    # The loader runs here, in the parent, as it would in-process; its time
                    # counts against the deadline the same way.
                    assert loader is not None
                    worker.send({"source": loader(message["load"])})
                    continue
                if message.get("exit"):
                    self._discard(worker)  # it is exiting: do not hand it out again
                else:
                    self._give_back(worker)
                settled = True
                return _result(message)
        except _WorkerGoneError:
            worker.process.wait()
            code = worker.process.returncode
            self._discard(worker)
            settled = True
            raise TemplateLimitError(
                f"the render's process was stopped by the operating system ({_how(code)}): "
                "it went over the memory or CPU limit of isolated rendering",
                template=name,
                version=version,
                hint=_KILLED_HINT,
            ) from None
        except BaseException:
            # Anything else mid-protocol (the loader failed, KeyboardInterrupt): the worker's
            # state is unknown, so it is not reused.
            if not settled:
                self._discard(worker)
            raise


def _how(returncode: int | None) -> str:
    if returncode is None:
        return "unknown exit"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit status {returncode}"


def _result(message: Mapping[str, Any]) -> str:
    if "text" in message:
        text: str = message["text"]
        return text
    error = message["error"]
    cls = _ERROR_CLASSES.get(error["class"], TemplateRenderError)
    raise cls(
        error["detail"],
        template=error["template"],
        version=error["version"],
        lineno=error["lineno"],
        hint=error["hint"],
    )


# -- the worker side ---------------------------------------------------------------------------


def _set_limits(memory_bytes: int) -> None:
    import resource  # noqa: PLC0415 - POSIX only, and only in workers

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        memory_bytes = min(memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, hard))


def _arm_cpu_limit(timeout_s: float) -> None:
    """Let this render use at most ``timeout_s`` (rounded up) + 1 more CPU seconds."""
    import resource  # noqa: PLC0415 - POSIX only, and only in workers

    usage = resource.getrusage(resource.RUSAGE_SELF)
    spent = usage.ru_utime + usage.ru_stime
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(spent + timeout_s) + 1
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def _worker_main(config: Mapping[str, Any]) -> None:
    from prompt_tool.core.engine import TemplateEngine  # noqa: PLC0415 - engine imports us
    from prompt_tool.settings import Settings  # noqa: PLC0415

    stdin = sys.stdin.buffer
    # The protocol gets its own copy of stdout; anything else printing goes to stderr.
    stdout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)

    def send(message: Mapping[str, Any]) -> None:
        stdout.write(json.dumps(message).encode("ascii") + b"\n")
        stdout.flush()

    # Never isolate again inside a worker.
    settings = Settings(**config["settings"]).with_(render_isolation="in-process")
    engine = TemplateEngine(settings=settings)
    _set_limits(int(config["memory_bytes"]))
    send({"ready": True})

    def ask(name: str) -> str | None:
        send({"load": name})
        line = stdin.readline()
        if not line:
            raise SystemExit(0)
        source: str | None = json.loads(line)["source"]
        return source

    for line in stdin:
        request = json.loads(line)
        limits = RenderLimits(**request["limits"])
        _arm_cpu_limit(limits.timeout_s)
        try:
            text = engine.render(
                request["source"],
                request["variables"],
                name=request["name"],
                version=request["version"],
                limits=limits,
                loader=ask if request["has_loader"] else None,
            )
            reply: dict[str, Any] = {"text": text}
        except TemplateError as exc:
            reply = {"error": _error_fields(exc)}
        except MemoryError:
            # Out of address space: report in one line, then exit so a fresh worker replaces
            # this one rather than reuse a heap that just ran dry.
            reply = {
                "error": _error_fields(
                    TemplateLimitError(
                        "the render ran out of the memory allowed to isolated rendering",
                        template=request["name"],
                        version=request["version"],
                        hint=_KILLED_HINT,
                    )
                ),
                "exit": True,
            }
            send(reply)
            raise SystemExit(3) from None
        except Exception as exc:  # noqa: BLE001 - a bug, not the template: report it plainly
            reply = {
                "error": _error_fields(
                    TemplateRenderError(
                        f"the isolated render failed: {type(exc).__name__}",
                        template=request["name"],
                        version=request["version"],
                    )
                )
            }
        send(reply)


def _error_fields(exc: TemplateError) -> dict[str, Any]:
    return {
        "class": type(exc).__name__,
        "detail": exc.detail,
        "template": exc.template,
        "version": exc.version,
        "lineno": exc.lineno,
        "hint": exc.hint,
    }


if __name__ == "__main__":
    _worker_main(json.loads(sys.argv[1]))
