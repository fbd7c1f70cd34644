"""Cloud preemption notices (AWS, GCP, Azure metadata services) turned into StopSignal requests.

A daemon thread polls the instance metadata service every few seconds. Standard library only, every
request with a short explicit timeout and no proxy, so nothing here can hang the trainer; on a laptop
or a pod without a metadata service it logs one debug line and goes away.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from trainer.spot.stop import StopSignal

log = logging.getLogger(__name__)

MODES = ("auto", "none", "aws", "gcp", "azure")
PROVIDERS = ("gcp", "aws", "azure")  # probe answers are trusted in this order (GCP's is the most specific)
# All three answer on the link-local address. GCP's documented name is metadata.google.internal, but the
# IP works there too and needs no DNS lookup, which urllib's timeout would not cover.
DEFAULT_ENDPOINTS = {p: "http://169.254.169.254" for p in PROVIDERS}

AWS_TOKEN_TTL_S = 21600
AWS_DEFAULT_NOTICE_S = 120.0  # "two minutes" when the notice's time cannot be read
GCP_NOTICE_S = 30.0  # GCP gives preempted VMs about 30 s after setting preempted=TRUE
AZURE_MIN_NOTICE_S = 30.0  # a Preempt event is scheduled at least 30 s ahead
RUNPOD_GRACE_S = 5.0  # RunPod: SIGTERM, then SIGKILL about 5 s later (no notice service; launch/runpod.sh)
AZURE_EVENTS_API = "2020-07-01"
AZURE_INSTANCE_API = "2021-02-01"
AZURE_STOP_EVENTS = ("Preempt", "Terminate")

# Metadata services are link-local: never send these requests through an HTTP proxy from the env.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class MetadataUnavailable(Exception):
    """The metadata service did not answer, or answered something unexpected."""


@dataclass
class Notice:
    provider: str
    kind: str  # "stop": the machine is going away | "rebalance": elevated risk, checkpoint early
    reason: str  # short, for events.jsonl: "aws:terminate", "gcp:preempted", "azure:Preempt"
    deadline: float | None  # unix time the machine goes away
    detail: str
    id: str | None = None  # names this notice across restarts (a rebalance recommendation: its noticeTime)


def _http(method: str, url: str, headers: dict, timeout: float) -> tuple[int, dict, bytes]:
    """One request; HTTP error statuses are answers, transport failures raise MetadataUnavailable."""
    req = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "PUT" else None)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read(65536)
    except urllib.error.HTTPError as e:
        try:
            body = e.read(65536)
        except (OSError, http.client.HTTPException):
            body = b""
        return e.code, dict(e.headers.items()) if e.headers else {}, body
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError, timeouts, resets, bad URL
        raise MetadataUnavailable(f"{method} {url}: {getattr(e, 'reason', e)}") from None


def _parse_iso(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00")).astimezone(timezone.utc).timestamp()
    except (ValueError, AttributeError):
        return None


def _parse_http_date(text: str) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


class AwsMetadata:
    """EC2 IMDSv2: spot instance-action (stop) and rebalance recommendation (checkpoint early)."""

    name = "aws"

    def __init__(self, base: str, timeout: float) -> None:
        self.base, self.timeout = base.rstrip("/"), timeout
        self._token: str | None = None
        self._token_until = 0.0
        self._rebalance_seen = False

    def _new_token(self) -> str:
        status, _, body = _http(
            "PUT",
            f"{self.base}/latest/api/token",
            {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)},
            self.timeout,
        )
        if status != 200 or not body.strip():
            raise MetadataUnavailable(f"aws token request answered HTTP {status}")
        self._token = body.decode("ascii", "replace").strip()
        self._token_until = time.monotonic() + AWS_TOKEN_TTL_S - 60
        return self._token

    def _get(self, path: str) -> tuple[int, bytes]:
        token = self._token if self._token and time.monotonic() < self._token_until else self._new_token()
        status, _, body = _http("GET", self.base + path, {"X-aws-ec2-metadata-token": token}, self.timeout)
        if status == 401:  # token expired or revoked: get a new one and ask again
            status, _, body = _http(
                "GET", self.base + path, {"X-aws-ec2-metadata-token": self._new_token()}, self.timeout
            )
        return status, body

    def probe(self) -> bool:
        try:
            self._new_token()
            return True
        except MetadataUnavailable:
            return False

    def poll(self) -> Notice | None:
        status, body = self._get("/latest/meta-data/spot/instance-action")
        if status == 200:
            try:
                doc = json.loads(body)
                action, when = str(doc.get("action", "terminate")), str(doc.get("time", ""))
            except (ValueError, AttributeError):
                action, when = "terminate", ""
            deadline = _parse_iso(when) or time.time() + AWS_DEFAULT_NOTICE_S
            return Notice("aws", "stop", f"aws:{action}", deadline, f"spot instance-action {action} at {when or '?'}")
        if status != 404:
            raise MetadataUnavailable(f"aws instance-action answered HTTP {status}")
        if not self._rebalance_seen:
            status, body = self._get("/latest/meta-data/events/recommendations/rebalance")
            if status == 200:
                self._rebalance_seen = True
                try:
                    when = str(json.loads(body).get("noticeTime", ""))
                except (ValueError, AttributeError):
                    when = ""
                return Notice(
                    "aws",
                    "rebalance",
                    "aws:rebalance",
                    None,
                    f"rebalance recommendation at {when or '?'}",
                    id=f"aws:rebalance:{when[:64]}" if when else None,  # no time: nothing to tell two apart
                )
        return None


class GcpMetadata:
    """GCE metadata: instance/preempted turns TRUE about 30 s before the VM stops."""

    name = "gcp"
    HEADERS = {"Metadata-Flavor": "Google"}

    def __init__(self, base: str, timeout: float) -> None:
        self.base, self.timeout = base.rstrip("/"), timeout

    def _preempted(self) -> str:
        status, headers, body = _http(
            "GET", f"{self.base}/computeMetadata/v1/instance/preempted", self.HEADERS, self.timeout
        )
        # The header is what tells GCE's metadata server apart from anything else on 169.254.169.254.
        flavor = {k.lower(): v for k, v in headers.items()}.get("metadata-flavor")
        if status != 200 or flavor != "Google":
            raise MetadataUnavailable(f"gcp preempted answered HTTP {status} (Metadata-Flavor: {flavor})")
        return body.decode("ascii", "replace").strip().upper()

    def probe(self) -> bool:
        try:
            return self._preempted() in ("TRUE", "FALSE")
        except MetadataUnavailable:
            return False

    def poll(self) -> Notice | None:
        if self._preempted() == "TRUE":
            return Notice("gcp", "stop", "gcp:preempted", time.time() + GCP_NOTICE_S, "instance/preempted is TRUE")
        return None


class AzureMetadata:
    """Azure IMDS Scheduled Events: a Preempt (spot eviction) or Terminate event for this VM."""

    name = "azure"
    HEADERS = {"Metadata": "true"}

    def __init__(self, base: str, timeout: float) -> None:
        self.base, self.timeout = base.rstrip("/"), timeout
        self.vm_name: str | None = None  # events of an availability set reach every VM in it

    def probe(self) -> bool:
        try:
            status, _, body = _http(
                "GET", f"{self.base}/metadata/instance?api-version={AZURE_INSTANCE_API}", self.HEADERS, self.timeout
            )
            if status != 200:
                return False
            doc = json.loads(body)
            self.vm_name = (doc.get("compute") or {}).get("name") or None
            return isinstance(doc, dict) and "compute" in doc
        except (MetadataUnavailable, ValueError, AttributeError):
            return False

    def poll(self) -> Notice | None:
        status, _, body = _http(
            "GET", f"{self.base}/metadata/scheduledevents?api-version={AZURE_EVENTS_API}", self.HEADERS, self.timeout
        )
        if status != 200:
            raise MetadataUnavailable(f"azure scheduledevents answered HTTP {status}")
        try:
            events = json.loads(body).get("Events") or []
        except (ValueError, AttributeError):
            raise MetadataUnavailable("azure scheduledevents: not a JSON document") from None
        found = None
        for ev in events:
            resources = ev.get("Resources") or []
            if ev.get("EventType") not in AZURE_STOP_EVENTS or ev.get("EventStatus") == "Completed":
                continue
            if self.vm_name and resources and self.vm_name not in resources:
                continue
            deadline = _parse_http_date(ev.get("NotBefore") or "") or time.time() + AZURE_MIN_NOTICE_S
            if found is None or deadline < found.deadline:
                found = Notice(
                    "azure",
                    "stop",
                    f"azure:{ev['EventType']}",
                    deadline,
                    f"scheduled event {ev.get('EventId', '?')} {ev['EventType']} "
                    f"not before {ev.get('NotBefore') or 'now'}",
                )
        return found


CLIENTS = {"aws": AwsMetadata, "gcp": GcpMetadata, "azure": AzureMetadata}


class NoticeMemory:
    """The notices a checkpoint was taken for, in the run dir (a JSON list of ids), so a restart does not act twice."""

    KEEP = 100

    def __init__(self, path: Path):
        self.path = path

    def _read(self) -> list[str]:
        try:
            ids = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []

    def seen(self, notice_id: str) -> bool:
        return notice_id in self._read()

    def remember(self, ids: list[str]) -> None:
        if not ids:
            return
        from trainer.durable import replace_file

        known = self._read()
        known += [i for i in ids if i not in known]
        replace_file(self.path, json.dumps(known[-self.KEEP :]).encode())


class NoticeWatcher:
    """Polls the cloud's metadata service in a daemon thread and requests a stop on a preemption notice."""

    def __init__(
        self,
        stop: StopSignal,
        mode: str = "auto",
        poll_seconds: float = 5.0,
        endpoints: dict | None = None,
        timeout: float = 1.0,
        probe_timeout: float = 0.5,
        memory: NoticeMemory | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"preemption.watch: {mode!r} is not one of {', '.join(MODES)}")
        self.stop, self.mode, self.poll_seconds = stop, mode, poll_seconds
        self.endpoints = {**DEFAULT_ENDPOINTS, **(endpoints or {})}
        self.timeout, self.probe_timeout = timeout, probe_timeout
        self.provider: str | None = None
        self.notice: Notice | None = None
        self.rebalance: Notice | None = None
        self.memory = memory
        self._client = None
        self._failures = 0
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> NoticeWatcher:
        """Start the daemon thread (nothing for mode 'none')."""
        if self.mode != "none" and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cloud-notice-watcher", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 2.0) -> None:
        """Stop polling; waits at most `timeout` for a request in flight."""
        self._closing.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> NoticeWatcher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------ work

    def detect(self) -> str | None:
        """Which metadata service answers (probed in parallel, bounded by ~probe_timeout); None if none."""
        clients = {p: CLIENTS[p](self.endpoints[p], self.probe_timeout) for p in PROVIDERS}
        answered: dict[str, bool] = {}

        def probe(p: str) -> None:
            answered[p] = clients[p].probe()

        # Daemon threads, not an executor: a probe stuck past its timeout must not delay interpreter exit.
        threads = [
            threading.Thread(target=probe, args=(p,), daemon=True, name=f"metadata-probe-{p}") for p in PROVIDERS
        ]
        for t in threads:
            t.start()
        until = time.monotonic() + self.probe_timeout * 2 + 0.5
        for t in threads:
            t.join(max(0.0, until - time.monotonic()))
        for p in PROVIDERS:
            if answered.get(p):
                self._client = clients[p]
                self._client.timeout = self.timeout
                return p
        return None

    def check_once(self) -> Notice | None:
        """Poll once and act on what it says; errors are logged quietly and return None."""
        if self._client is None:
            if self.mode == "auto":
                self.provider = self.detect()
                if self.provider is None:
                    return None
            else:
                self.provider = self.mode
                self._client = CLIENTS[self.mode](self.endpoints[self.mode], self.timeout)
        try:
            notice = self._client.poll()
        except MetadataUnavailable as e:
            self._failures += 1
            log.debug("%s metadata: %s", self.provider, e)
            if self._failures == 3:
                log.warning(
                    "%s metadata service is not answering (%s); preemption notices may be missed, SIGTERM still works",
                    self.provider,
                    e,
                )
            return None
        self._failures = 0
        if notice is not None:
            self._act(notice)
        return notice

    def _act(self, notice: Notice) -> None:
        if notice.kind == "stop":
            self.notice = notice
            left = f"{max(0.0, notice.deadline - time.time()):.0f} s" if notice.deadline else "unknown time"
            log.warning(
                "%s preemption notice: %s; stopping at the next step (%s left)", notice.provider, notice.detail, left
            )
            self.stop.request(notice.reason, notice.deadline)
        else:
            self.rebalance = notice
            if self.memory is not None and notice.id is not None and self.memory.seen(notice.id):
                # a restarted process sees the same recommendation again: its checkpoint was taken already
                log.info("%s: %s; checkpointed for it already, not again", notice.provider, notice.detail)
                return
            log.warning(
                "%s: %s; the machine is at elevated risk of preemption: checkpointing early, training continues",
                notice.provider,
                notice.detail,
            )
            self.stop.request_checkpoint(notice.reason, notice.id)

    def _run(self) -> None:
        if self.mode == "auto":
            self.provider = self.detect()
            if self.provider is None:
                log.debug("no cloud metadata service answered; relying on SIGTERM alone")
                return
            log.debug("watching %s metadata for preemption notices every %.0f s", self.provider, self.poll_seconds)
        while not self._closing.is_set():
            notice = self.check_once()
            if notice is not None and notice.kind == "stop":
                return
            self._closing.wait(self.poll_seconds)
