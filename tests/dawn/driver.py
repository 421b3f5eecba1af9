"""Headless Chromium driven over the DevTools protocol on a pipe, and the loopback HTTP
server that gives it its pages.

Chromium runs with ``--remote-debugging-pipe``: it reads NUL-terminated JSON commands on
fd 3 and writes replies and events on fd 4, so no websocket library is needed. Every read
has a deadline (a hung GPU call fails the caller instead of hanging the run), and
Chromium's stderr goes to a file whose tail each error carries.
"""

from __future__ import annotations

import http.server
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

__all__ = ["BrowserError", "Browser", "Server", "find_chromium", "with_browser",
           "CHROMIUM_FLAGS"]

#: WebGPU on SwiftShader (Dawn's CPU Vulkan adapter), and nothing that reaches the network.
CHROMIUM_FLAGS = (
    "--headless", "--enable-unsafe-webgpu", "--use-webgpu-adapter=swiftshader",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--disable-quic", "--no-default-browser-check",
    "--disable-crash-reporter",
    # Containers often give /dev/shm only 64 MB, too little for a renderer's buffers.
    "--disable-dev-shm-usage",
)


# Moves fds argv[1] and argv[2] to 3 and 4 (through fresh descriptors, so that neither
# is overwritten before it is moved) and execs argv[3:].
_TRAMPOLINE = """import os, sys
a, b = os.dup(int(sys.argv[1])), os.dup(int(sys.argv[2]))
os.dup2(a, 3)
os.dup2(b, 4)
os.set_inheritable(3, True)
os.set_inheritable(4, True)
for fd in {a, b, int(sys.argv[1]), int(sys.argv[2])} - {3, 4}:
    os.close(fd)
os.execv(sys.argv[3], sys.argv[3:])
"""


class BrowserError(RuntimeError):
    """A page error, a protocol error, a timeout or a browser that went away."""


def find_chromium() -> tuple[str | None, str]:
    """(path of the Chromium binary or None, why there is none): ``$QLINEAR_CHROMIUM``
    (a path or name; ``off`` disables), else chromium, chromium-browser or google-chrome."""
    env = os.environ.get("QLINEAR_CHROMIUM")
    if env is not None:
        if env.strip().lower() == "off":
            return None, "QLINEAR_CHROMIUM=off"
        found = shutil.which(env)
        return found, "" if found else f"QLINEAR_CHROMIUM={env!r} is not an executable"
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found, ""
    return None, ("no Chromium found (chromium, chromium-browser or google-chrome on PATH, "
                  "or QLINEAR_CHROMIUM=/path/to/chrome); on Debian: apt-get install chromium")


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves ``/<prefix>/<path>`` from the server's root of that prefix, never cached."""

    server: Server

    def translate_path(self, path: str) -> str:
        p = urllib.parse.urlsplit(path).path
        for prefix, root in self.server.roots.items():
            if p.startswith(f"/{prefix}/"):
                self.directory = str(root)
                return super().translate_path(p[len(prefix) + 1:])
        return ""  # no such file: 404

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


class Server(http.server.ThreadingHTTPServer):
    """A loopback HTTP server on a free port serving ``roots`` ({prefix: directory})."""

    daemon_threads = True

    def __init__(self, roots: dict[str, Path]):
        self.roots = {k: Path(v) for k, v in roots.items()}
        super().__init__(("127.0.0.1", 0), _Handler)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def url(self, prefix: str, path: str) -> str:
        """The URL of ``path`` under ``prefix``."""
        return f"http://127.0.0.1:{self.server_address[1]}/{prefix}/{path}"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


class Browser:
    """A headless Chromium with one page open at ``url``.

    ``evaluate(expression)`` runs JavaScript in the page (awaiting a promise) and returns
    its JSON value; ``close()`` ends the browser and removes its profile directory."""

    def __init__(self, binary: str, url: str, timeout: float = 60.0):
        self.binary = binary
        self.profile = tempfile.mkdtemp(prefix="qlinear-chromium-")
        self.stderr_path = os.path.join(self.profile, "stderr.log")
        self.console: list[str] = []
        self._buf = b""
        self._id = 0
        self.proc: subprocess.Popen | None = None
        try:
            self._start()
            self.session = self.open(url, timeout)
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        args = [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
                "--remote-debugging-pipe", "about:blank"]
        # Chromium's sandbox refuses to run as root.
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")

        self._stderr = open(self.stderr_path, "wb")
        try:
            # A small trampoline puts the pipe ends on fds 3 and 4, then execs Chromium (no
            # preexec_fn: the HTTP server's thread is running). A session of its own: a
            # forced close ends Chromium's child processes too.
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _TRAMPOLINE, str(to_chrome_r), str(from_chrome_w),
                 *args], pass_fds=(to_chrome_r, from_chrome_w), start_new_session=True,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr)
        finally:
            os.close(to_chrome_r)
            os.close(from_chrome_w)

    def stderr_tail(self, chars: int = 4000) -> str:
        """The end of Chromium's stderr."""
        try:
            return Path(self.stderr_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _error(self, what: str) -> BrowserError:
        tail = self.stderr_tail()
        console = "\n".join(self.console[-20:])
        return BrowserError(f"{what}\n-- page console --\n{console}\n"
                            f"-- chromium stderr (tail) --\n{tail}")

    def _send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._to_chrome, data):]
        except OSError as e:
            raise self._error(f"{method}: writing to Chromium failed ({e})") from e
        return self._id

    def _event(self, msg: dict) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
            self.console.append(f"console.{p.get('type')}: {text}")
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.console.append(f"exception: {d.get('exception', {}).get('description') or d}")

    def _recv(self, want: int, deadline: float, what: str) -> dict:
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                msg = json.loads(raw)
                if msg.get("id") == want:
                    if "error" in msg:
                        raise self._error(f"{what}: DevTools error {msg['error']}")
                    return msg["result"]
                self._event(msg)
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._error(f"{what}: no answer from Chromium in time")
            ready, _, _ = select.select([self._from_chrome], [], [], min(left, 1.0))
            if not ready:
                if self.proc is not None and self.proc.poll() is not None:
                    raise self._error(f"{what}: Chromium exited ({self.proc.returncode})")
                continue
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise self._error(f"{what}: Chromium closed the DevTools pipe")
            self._buf += chunk

    def call(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        """One DevTools command; its result."""
        return self._recv(self._send(method, params, session), time.monotonic() + timeout,
                          method)

    def open(self, url: str, timeout: float = 60.0) -> str:
        """Open ``url`` in a new tab; its session id, once ``window.qlinearReady`` (which the
        page sets to a promise) has resolved."""
        target = self.call("Target.createTarget", {"url": url}, timeout=timeout)["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                            timeout=timeout)["sessionId"]
        self.call("Runtime.enable", session=session, timeout=timeout)
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            try:
                ready = self.evaluate("typeof window.qlinearReady", session=session,
                                      timeout=timeout)
                if ready != "undefined":
                    break
            except BrowserError as e:  # the context went away while the page loaded
                last = str(e)
            if time.monotonic() > deadline:
                raise self._error(f"{url}: the page never set window.qlinearReady {last}")
            time.sleep(0.05)
        self.evaluate("window.qlinearReady.then(() => true)", session=session, timeout=timeout)
        return session

    def evaluate(self, expression: str, session: str | None = None, timeout: float = 60.0):
        """The JSON value of ``expression`` (a promise is awaited) in the page; a thrown
        error or rejection raises :class:`BrowserError` with its message."""
        r = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                           "returnByValue": True},
                      session=session or self.session, timeout=timeout)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text") or str(d)
            raise BrowserError(f"page error: {text}")
        return r["result"].get("value")

    def close(self) -> None:
        """End Chromium (politely, then by force) and remove its profile directory."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self._send("Browser.close")
                self.proc.wait(timeout=10)
            except (BrowserError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        for fd in ("_to_chrome", "_from_chrome"):
            if hasattr(self, fd):
                try:
                    os.close(getattr(self, fd))
                except OSError:
                    pass
                delattr(self, fd)
        if hasattr(self, "_stderr"):
            self._stderr.close()
        shutil.rmtree(self.profile, ignore_errors=True)


def with_browser(roots: dict[str, Path], page: tuple[str, str]) -> tuple[Server, Browser]:
    """Start a :class:`Server` of ``roots`` and a :class:`Browser` on ``page`` (prefix,
    path); the caller stops both (the server is stopped here if the browser fails)."""
    binary, why = find_chromium()
    if binary is None:
        raise BrowserError(why)
    server = Server(roots)
    try:
        return server, Browser(binary, server.url(*page))
    except BaseException:
        server.stop()
        raise

