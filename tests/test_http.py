"""The HTTP port: Prometheus metrics scraped after a real flow, the status page without patient
data, the token-guarded retry of a dead delivery, and nothing else answered."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pydicom
import pytest
from conftest import DATA
from dicom_factory import chest_pixels, make_dataset, write
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from scxnn_node.config import ConfigError, load_config
from scxnn_node.http.metrics import LATENCY_BUCKETS, metrics_text
from scxnn_node.http.server import HttpServer
from scxnn_node.http.view import NodeView
from scxnn_node.logs import short_hash
from scxnn_node.model.manifest import read_manifest
from scxnn_node.store.audit import append_audit
from scxnn_node.store.db import Database
from scxnn_node.store.models import AuditAction, Delivery
from scxnn_node.store.spool import Spool
from scxnn_node.testing.http_flow import node_after_flow
from scxnn_node.testing.loopback import free_port, node_config, wait_for

Samples = dict[tuple[str, frozenset], float]
EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "config.yaml"


def _samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


def _total(samples: Samples, metric: str, /, **labels: str) -> float:
    """Sum over the samples of `metric` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == metric and wanted <= ls)


# --- configuration -----------------------------------------------------------------------


def test_http_keys_as_written_and_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("http: {enabled: true, host: 127.0.0.1, port: 8080}   # GET /metrics\n")
    http = load_config(path, environ={}).http
    assert (http.enabled, http.host, http.port, http.retry_token_env) == (
        True,
        "127.0.0.1",
        8080,
        None,
    )
    default = load_config(None, environ={}).http
    assert (default.enabled, default.host, default.port) == (False, "127.0.0.1", 8080)
    assert load_config(EXAMPLE_CONFIG, environ={}).http == default  # documented = default
    path.write_text("http: {enabled: true, token: secret}\n")
    with pytest.raises(ConfigError, match=r"http\.token: unknown key"):
        load_config(path, environ={})


def test_the_http_package_imports_no_torch(tmp_path):
    probe = (
        "import sys, scxnn_node.http.server; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


# --- metrics from audit records, without a flow ----------------------------------------


@pytest.fixture
def view(tmp_path, small_bundle_dir) -> NodeView:
    config = node_config(
        tmp_path,
        model={"bundle": str(small_bundle_dir)},
        http={"enabled": True, "port": free_port()},
    )
    db = Database(config.database.url)
    db.create_schema()
    return NodeView(config, db, Spool(config.storage.spool_dir), read_manifest(small_bundle_dir))


def test_counters_and_latency_buckets_come_from_the_audit_trail(view):
    with view.db.session() as s:
        for size in (1000, 2500):
            append_audit(s, AuditAction.RECEIVED, outcome="stored", size_bytes=size)
        append_audit(s, AuditAction.RECEIVED, outcome="duplicate", size_bytes=1000)
        append_audit(s, AuditAction.SKIPPED, outcome="body_part", size_bytes=500)
        append_audit(s, AuditAction.REFUSED, outcome="0xC000")
        append_audit(s, AuditAction.ASSOCIATION_REFUSED, outcome="calling_ae")
        append_audit(s, AuditAction.ANALYSED, outcome="abnormal", risk_tier="critical", seconds=4)
        append_audit(s, AuditAction.ANALYSED, outcome="abnormal", risk_tier="critical", seconds=6)
        append_audit(s, AuditAction.ANALYSED, outcome="definite_normal", seconds=2.5)
        for seconds in (3.0, 7.0, 45.0, 7200.0):
            append_audit(s, AuditAction.DELIVERED, party="pacs", outcome="sr", seconds=seconds)
        append_audit(s, AuditAction.DELIVERED, party="pacs", outcome="summary", seconds=1.0)
        append_audit(s, AuditAction.DEAD, party="archive", outcome="sr")
    samples = _samples(metrics_text(view).decode())
    received = "scxnn_instances_received_total"
    assert _value(samples, received, outcome="stored", reason="") == 2
    assert _value(samples, received, outcome="duplicate", reason="") == 1
    assert _value(samples, received, outcome="skipped", reason="body_part") == 1
    assert _value(samples, received, outcome="refused", reason="0xC000") == 1
    assert _value(samples, "scxnn_received_bytes_total") == 5000
    assert _value(samples, "scxnn_associations_refused_total", reason="calling_ae") == 1
    assert _value(samples, "scxnn_verdicts_total", verdict="abnormal", tier="critical") == 2
    assert _value(samples, "scxnn_verdicts_total", verdict="definite_normal", tier="") == 1
    assert _value(samples, "scxnn_worker_busy_seconds_total") == pytest.approx(12.5)
    assert _value(samples, "scxnn_deliveries_sent_total", kind="sr") == 4
    assert _value(samples, "scxnn_deliveries_given_up_total") == 1
    # Only the SRs' latencies, cumulative per bound: 3 <= 5, 7 <= 10, 45 <= 60, 7200 only +Inf.
    expected = {5.0: 1, 10.0: 2, 20.0: 2, 30.0: 2, 60.0: 3, 3600.0: 3}
    for bound, count in expected.items():
        assert bound in LATENCY_BUCKETS
        assert _value(samples, "scxnn_result_latency_seconds_bucket", le=str(bound)) == count
    assert _value(samples, "scxnn_result_latency_seconds_bucket", le="+Inf") == 4
    assert _value(samples, "scxnn_result_latency_seconds_count") == 4
    assert _value(samples, "scxnn_result_latency_seconds_sum") == pytest.approx(7255.0)
    assert _value(samples, "scxnn_bundle_info", name="test-bundle", version="1.2.3") == 1


def test_retry_is_off_without_a_token_and_the_server_stops(view):
    server = HttpServer(view.config, view.db, view.spool, view.manifest)
    server.start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        import urllib.error
        import urllib.request

        with urllib.request.urlopen(url + "/", timeout=30) as page:
            assert "Retry from this page is off" in page.read().decode()
        request = urllib.request.Request(url + "/deliveries/1/retry", data=b"token=", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 403
    finally:
        server.shutdown()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", server.config.http.port)) != 0  # closed


def test_a_port_in_use_fails_at_start(view):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", view.config.http.port))
        taken.listen()
        server = HttpServer(view.config, view.db, view.spool, view.manifest)
        with pytest.raises(OSError):
            server.start()


# --- after a real flow ---------------------------------------------------------------------

PATIENT_NAME = "Doe^Janet"
PATIENT_ID = "PID-4711-0815"


@pytest.fixture(scope="module")
def flow(tmp_path_factory, small_bundle_dir):
    tmp = tmp_path_factory.mktemp("http")
    named = make_dataset(chest_pixels(128, seed=3, bits=12))
    named.PatientName, named.PatientID = PATIENT_NAME, PATIENT_ID
    knee = make_dataset(chest_pixels(128, seed=4, bits=12), body_part="KNEE")
    files = [
        DATA / "nih_dx_no_finding.dcm",
        DATA / "siim_cr_negative.dcm",
        write(named, tmp / "named.dcm"),
        write(knee, tmp / "knee.dcm"),
        DATA / "nih_dx_no_finding.dcm",  # again: a duplicate, answered Success, nothing new
    ]
    token_env = f"SCXNN_TEST_RETRY_TOKEN_{uuid.uuid4().hex[:8]}"
    os.environ[token_env] = "s3cret-token"
    try:
        with node_after_flow(tmp, small_bundle_dir, files, 3, retry_token_env=token_env) as f:
            f.files = files
            yield f
    finally:
        del os.environ[token_env]


def _identifiers(files: list[Path]) -> set[str]:
    """Everything in the sent files that would identify a patient or a study."""
    values = set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            values.add(str(ds.get(keyword, "")))
        for keyword in ("PatientName", "PatientID", "AccessionNumber"):
            value = str(ds.get(keyword, "") or "")
            if len(value) >= 4:
                values.add(value)
    return values - {""}


def test_metrics_after_a_real_flow(flow):
    status, content_type, text = flow.get("/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    samples = _samples(text)
    # The state tables: 5 instances sent (3 chest, 1 knee, 1 duplicate), 3 studies reported.
    assert _value(samples, "scxnn_instances", state="stored") == 3
    assert _value(samples, "scxnn_instances", state="skipped") == 1
    assert _value(samples, "scxnn_studies", state="reported") == 3
    assert _value(samples, "scxnn_jobs", state="done") == 3
    assert _value(samples, "scxnn_jobs", state="ready") == 0
    assert _value(samples, "scxnn_deliveries", destination="pacs", state="sent") == 6
    assert _value(samples, "scxnn_deliveries", destination="archive", state="dead") == 6
    assert _value(samples, "scxnn_deliveries", destination="archive", state="sent") == 0
    assert _value(samples, "scxnn_deliveries_dead") == 6
    assert _value(samples, "scxnn_oldest_waiting_study_seconds") == 0
    assert _value(samples, "scxnn_workers_alive") == 1
    assert _value(samples, "scxnn_spool_free_bytes") > 0
    assert _value(samples, "scxnn_bundle_info", name="test-bundle", version="1.2.3") == 1
    # The audit trail: what the node recorded while the flow ran.
    assert _total(samples, "scxnn_instances_received_total") == len(flow.files)
    assert _value(samples, "scxnn_instances_received_total", outcome="stored", reason="") == 3
    assert _value(samples, "scxnn_instances_received_total", outcome="duplicate", reason="") == 1
    assert _total(samples, "scxnn_instances_received_total", outcome="skipped") == 1
    assert _total(samples, "scxnn_instances_received_total", outcome="refused") == 0
    assert _value(samples, "scxnn_received_bytes_total") > 0
    assert _total(samples, "scxnn_verdicts_total") == 3  # one verdict per chest study
    assert _value(samples, "scxnn_worker_busy_seconds_total") > 0
    # The live worker's pipeline: its engine ran; its wait for decoding is there to be read.
    engine = [ls for (n, ls) in samples if n == "scxnn_worker_engine_seconds_total"]
    waited = [ls for (n, ls) in samples if n == "scxnn_worker_decode_wait_seconds_total"]
    assert len(engine) == len(waited) == 1 and engine == waited
    assert _total(samples, "scxnn_worker_engine_seconds_total") > 0
    assert _value(samples, "scxnn_deliveries_sent_total", kind="sr") == 3
    assert _value(samples, "scxnn_deliveries_sent_total", kind="summary") == 3
    assert _value(samples, "scxnn_deliveries_given_up_total") == 6
    # Every SR sent to the PACS has its latency; none reached the archive.
    assert _value(samples, "scxnn_result_latency_seconds_count") == 3
    assert _value(samples, "scxnn_result_latency_seconds_bucket", le="+Inf") == 3
    assert _value(samples, "scxnn_result_latency_seconds_sum") > 0
    for identifier in _identifiers(flow.files):
        assert identifier not in text


def test_status_page_shows_the_flow_without_patient_data(flow):
    status, content_type, page = flow.get("/")
    assert status == 200 and content_type.startswith("text/html")
    for section in ("Queue", "Workers", "Last studies", "Deliveries not sent", "Drift", "Disk"):
        assert f"<h2>{section}</h2>" in page
    chest = flow.files[:3]
    for path in chest:  # each chest study, hashed, with its verdict
        study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
        assert short_hash(study) in page
    assert page.count('action="/deliveries/') == 6  # a retry form per dead delivery
    identifiers = _identifiers(flow.files)
    assert {PATIENT_NAME, PATIENT_ID} <= identifiers
    for identifier in identifiers:
        assert identifier not in page
    assert "s3cret-token" not in page


def _dead_archive_delivery(flow) -> Delivery:
    with flow.node.db.session() as s:
        return s.execute(
            select(Delivery)
            .where(Delivery.destination == "archive", Delivery.state == "dead")
            .order_by(Delivery.id)
            .limit(1)
        ).scalar_one()


def test_retry_of_a_dead_delivery_needs_the_token(flow):
    flow.down.start()  # the archive is back: a retried delivery would now reach it
    dead = _dead_archive_delivery(flow)
    path = f"/deliveries/{dead.id}/retry"
    form = "application/x-www-form-urlencoded"
    for data, headers in (
        (b"", {}),
        (b"token=wrong", {"Content-Type": form}),
        (b"", {"Authorization": "Bearer wrong"}),
    ):
        status, _type, body = flow.request("POST", path, data, headers)
        assert status == 403, body
    with flow.node.db.session() as s:  # the dispatcher ran meanwhile: nothing changed
        after = s.get(Delivery, dead.id)
        assert (after.state, after.attempts, after.updated_at) == (
            "dead",
            dead.attempts,
            dead.updated_at,
        )
    assert flow.down.received() == []
    status, _type, body = flow.request("POST", path, b"token=s3cret-token", {"Content-Type": form})
    assert status == 200 and f"Delivery {dead.id} is pending again." in body

    def state() -> str:
        with flow.node.db.session() as s:
            return s.get(Delivery, dead.id).state

    assert wait_for(lambda: state() == "sent", 60)
    assert len(flow.down.received()) == 1


def test_only_get_and_the_retry_post_are_answered(flow):
    assert flow.get("/nowhere")[0] == 404
    assert flow.get("/metrics/extra")[0] == 404
    assert flow.get("/?refresh=1")[0] == 200
    assert flow.request("POST", "/metrics", b"")[0] == 405
    assert flow.request("POST", "/", b"")[0] == 405
    assert flow.request("PUT", "/", b"")[0] == 405
    assert flow.request("DELETE", "/metrics")[0] == 405
    assert flow.request("POST", "/deliveries/abc/retry", b"")[0] == 404
