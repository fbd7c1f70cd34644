"""Notice watchers against loopback HTTP servers that answer as each provider's metadata service documents."""

import logging
import socket
import time
from datetime import datetime, timezone
from email.utils import format_datetime

import pytest

from tests.harness.metadata import Aws, Azure, FakeMetadata, Gcp
from trainer.spot.notices import GCP_NOTICE_S, NoticeWatcher
from trainer.spot.stop import StopSignal

pytestmark = pytest.mark.timeout(30)  # a watcher that hangs must fail the test, not the suite

FAST = dict(poll_seconds=0.05, timeout=0.3, probe_timeout=0.3)


@pytest.fixture
def serve():
    servers = []

    def start(behaviour):
        servers.append(FakeMetadata(behaviour))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def closed_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens here: connection refused


def _endpoints(closed_url, **live):
    return {p: live.get(p, closed_url) for p in ("aws", "gcp", "azure")}


# ---------------------------------------------------------------- AWS


def test_aws_404_then_spot_notice_requests_stop_with_its_deadline(serve):
    aws = Aws()
    server = serve(aws)
    stop = StopSignal()
    watcher = NoticeWatcher(stop, "aws", endpoints={"aws": server.url}, **FAST)
    assert watcher.check_once() is None  # 404: nothing scheduled
    assert not stop.requested

    when = datetime.fromtimestamp(int(time.time()) + 120, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    aws.action = {"action": "terminate", "time": when}
    with watcher:
        assert stop.wait(5.0)
    assert stop.reason == "aws:terminate"
    assert stop.deadline == datetime.strptime(when, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    assert 115 < stop.grace_left(25.0) <= 120
    puts = [r for r in server.requests if r[0] == "PUT"]
    gets = [r for r in server.requests if r[0] == "GET"]
    assert len(puts) == 1 and puts[0][2]["X-Aws-Ec2-Metadata-Token-Ttl-Seconds"] == "21600"
    assert gets and all(r[2].get("X-Aws-Ec2-Metadata-Token") == "token-0" for r in gets)


def test_aws_expired_token_is_refreshed_on_401(serve):
    aws = Aws()
    server = serve(aws)
    stop = StopSignal()
    watcher = NoticeWatcher(stop, "aws", endpoints={"aws": server.url}, **FAST)
    assert watcher.check_once() is None
    aws.tokens.clear()  # the service forgets the token (expiry, instance stop/start)
    aws.action = {"action": "stop", "time": "2017-09-18T08:22:00Z"}
    notice = watcher.check_once()
    assert notice is not None and notice.reason == "aws:stop"
    assert stop.requested and stop.deadline == datetime(2017, 9, 18, 8, 22, tzinfo=timezone.utc).timestamp()
    assert [r[0] for r in server.requests].count("PUT") == 2
    assert server.requests[-1][2]["X-Aws-Ec2-Metadata-Token"] == "token-1"


def test_aws_rebalance_recommendation_asks_for_a_checkpoint_but_does_not_stop(serve, caplog):
    aws = Aws()
    aws.rebalance = {"noticeTime": "2020-10-27T08:22:00Z"}
    server = serve(aws)
    stop = StopSignal()
    watcher = NoticeWatcher(stop, "aws", endpoints={"aws": server.url}, **FAST)
    with caplog.at_level(logging.WARNING, logger="trainer.spot.notices"):
        notice = watcher.check_once()
        assert watcher.check_once() is None  # recorded once, not repeated every poll
    assert notice.kind == "rebalance" and watcher.rebalance is notice
    assert stop.checkpoint_soon and stop.checkpoint_reason == "aws:rebalance"
    assert not stop.requested
    assert sum("rebalance" in r.getMessage() for r in caplog.records) == 1


# ---------------------------------------------------------------- GCP and Azure


def test_gcp_false_then_true_requests_stop_about_30s_ahead(serve):
    gcp = Gcp()
    server = serve(gcp)
    stop = StopSignal()
    watcher = NoticeWatcher(stop, "gcp", endpoints={"gcp": server.url}, **FAST)
    assert watcher.check_once() is None and not stop.requested
    gcp.preempted = "TRUE"
    with watcher:
        assert stop.wait(5.0)
    assert stop.reason == "gcp:preempted"
    assert GCP_NOTICE_S - 2 < stop.grace_left(25.0) <= GCP_NOTICE_S
    assert all(r[2].get("Metadata-Flavor") == "Google" for r in server.requests)


def test_azure_empty_events_then_preempt_for_this_vm(serve):
    azure = Azure(vm="spot-vm-1")
    server = serve(azure)
    stop = StopSignal()
    watcher = NoticeWatcher(stop, "auto", endpoints={"azure": server.url, "aws": server.url, "gcp": server.url}, **FAST)
    assert watcher.check_once() is None and watcher.provider == "azure"
    not_before = int(time.time()) + 45
    event = {
        "EventId": "602d9444-d2cd-49c7-8624-8643e7171297",
        "EventType": "Preempt",
        "ResourceType": "VirtualMachine",
        "EventStatus": "Scheduled",
        "EventSource": "Platform",
        "NotBefore": format_datetime(datetime.fromtimestamp(not_before, timezone.utc), usegmt=True),
        "Description": "",
        "DurationInSeconds": -1,
    }
    azure.events = [{**event, "Resources": ["another-vm"]}]  # same availability set, not us
    azure.incarnation = 2
    assert watcher.check_once() is None and not stop.requested
    azure.events = [{**event, "Resources": ["spot-vm-1"]}]
    azure.incarnation = 3
    with watcher:
        assert stop.wait(5.0)
    assert stop.reason == "azure:Preempt"
    assert stop.deadline == not_before


# ---------------------------------------------------------------- auto, slow and absent services


@pytest.mark.parametrize("provider", ["aws", "gcp", "azure"])
def test_auto_detects_the_provider_that_answers(serve, closed_url, provider):
    server = serve({"aws": Aws, "gcp": Gcp, "azure": Azure}[provider]())
    watcher = NoticeWatcher(StopSignal(), "auto", endpoints=_endpoints(closed_url, **{provider: server.url}), **FAST)
    assert watcher.detect() == provider


def test_gcp_probe_needs_the_metadata_flavor_response_header(serve, closed_url):
    gcp = Gcp()
    gcp.send_flavor = False  # something answers on the address, but it is not GCE's metadata server
    server = serve(gcp)
    watcher = NoticeWatcher(StopSignal(), "auto", endpoints=_endpoints(closed_url, gcp=server.url), **FAST)
    assert watcher.detect() is None


def test_no_metadata_service_is_quiet_and_the_thread_ends(closed_url, caplog):
    stop = StopSignal()
    start = time.monotonic()
    with caplog.at_level(logging.DEBUG, logger="trainer.spot.notices"):
        watcher = NoticeWatcher(stop, "auto", endpoints=_endpoints(closed_url), **FAST).start()
        watcher._thread.join(3.0)
    assert not watcher.running
    assert time.monotonic() - start < 1.5
    assert watcher.provider is None and not stop.requested
    records = [r for r in caplog.records if r.name == "trainer.spot.notices"]
    assert len(records) == 1 and records[0].levelno == logging.DEBUG


def test_slow_metadata_service_never_hangs_the_watcher(serve):
    def slow(method, path, headers):
        server.closing.wait(3.0)  # longer than every timeout below
        return 200, {"Metadata-Flavor": "Google"}, "TRUE"

    server = serve(slow)
    stop = StopSignal()
    endpoints = {p: server.url for p in ("aws", "gcp", "azure")}
    start = time.monotonic()
    assert NoticeWatcher(stop, "auto", endpoints=endpoints, **FAST).detect() is None
    assert time.monotonic() - start < 1.5
    for mode in ("aws", "gcp", "azure"):
        start = time.monotonic()
        assert NoticeWatcher(stop, mode, endpoints=endpoints, **FAST).check_once() is None
        assert time.monotonic() - start < 1.0
    watcher = NoticeWatcher(stop, "gcp", endpoints=endpoints, **FAST).start()
    time.sleep(0.1)
    start = time.monotonic()
    watcher.close(timeout=2.0)
    assert not watcher.running and time.monotonic() - start < 1.0
    assert not stop.requested


def test_mode_none_starts_nothing_and_bad_mode_is_refused():
    watcher = NoticeWatcher(StopSignal(), "none").start()
    assert watcher._thread is None and not watcher.running
    with pytest.raises(ValueError, match="preemption.watch"):
        NoticeWatcher(StopSignal(), "ibm")
