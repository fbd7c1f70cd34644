"""Loopback HTTP servers that answer as each cloud's instance metadata service documents (AWS IMDSv2, GCP, Azure)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class FakeMetadata:
    """A loopback HTTP server; `behaviour(method, path, headers) -> (status, headers, body)`."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.requests = []  # (method, path, {header: value})
        self.closing = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                fake.requests.append((self.command, self.path, dict(self.headers.items())))
                status, headers, body = fake.behaviour(self.command, self.path, self.headers)
                body = body.encode() if isinstance(body, str) else body
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (slow-server tests)
                    pass

            do_GET = do_PUT = _answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- provider behaviours


class Aws:
    """EC2 IMDSv2: PUT a token, GET metadata with it (401 without a valid one)."""

    def __init__(self):
        self.tokens = set()
        self.issued = 0
        self.action = None  # e.g. {"action": "terminate", "time": "..."}
        self.rebalance = None  # e.g. {"noticeTime": "..."}

    def __call__(self, method, path, headers):
        if path == "/latest/api/token":
            if method != "PUT" or not headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                return 400, {}, ""
            token = f"token-{self.issued}"
            self.issued += 1
            self.tokens.add(token)
            return 200, {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, token
        if method != "GET" or not path.startswith("/latest/meta-data/"):
            return 404, {}, ""
        if headers.get("X-aws-ec2-metadata-token") not in self.tokens:
            return 401, {}, ""
        if path == "/latest/meta-data/spot/instance-action" and self.action:
            return 200, {"Content-Type": "text/plain"}, json.dumps(self.action)
        if path == "/latest/meta-data/events/recommendations/rebalance" and self.rebalance:
            return 200, {"Content-Type": "text/plain"}, json.dumps(self.rebalance)
        return 404, {}, "Not Found"


class Gcp:
    def __init__(self):
        self.preempted = "FALSE"
        self.send_flavor = True

    def __call__(self, method, path, headers):
        if headers.get("Metadata-Flavor") != "Google":
            return 403, {}, "Missing Metadata-Flavor:Google header."
        out = {"Metadata-Flavor": "Google"} if self.send_flavor else {}
        if method == "GET" and path.split("?")[0] == "/computeMetadata/v1/instance/preempted":
            return 200, {**out, "Content-Type": "application/text"}, self.preempted
        return 404, out, ""


class Azure:
    def __init__(self, vm="spot-vm-1"):
        self.vm = vm
        self.events = []
        self.incarnation = 1

    def __call__(self, method, path, headers):
        if headers.get("Metadata") != "true":
            return 400, {}, json.dumps({"error": "Bad request. Required metadata header not specified"})
        parts = urlsplit(path)
        if "api-version=" not in (parts.query or ""):
            return 400, {}, json.dumps({"error": "Bad request. api-version was not specified"})
        if parts.path == "/metadata/instance":
            return 200, {"Content-Type": "application/json"}, json.dumps({"compute": {"name": self.vm}})
        if parts.path == "/metadata/scheduledevents":
            doc = {"DocumentIncarnation": self.incarnation, "Events": self.events}
            return 200, {"Content-Type": "application/json"}, json.dumps(doc)
        return 404, {}, ""
