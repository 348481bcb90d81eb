"""`tumorseg serve`: the DICOM node against real senders and receivers, on 127.0.0.1 with ports of
its own: pynetdicom and dcmtk's storescu as senders, a pynetdicom storage SCP and Orthanc (a real
PACS, Debian's `orthanc`) as destinations. The node runs as its own process (`tumorseg serve`), so
it can be killed and restarted."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import dicom3tools_findings, make_tiny_model, run_tool
from mutants import CANARY, small_real_series
from study_copies import copy_as_new_studies, free_port

pynetdicom = pytest.importorskip("pynetdicom", reason="needs pynetdicom (the serve extra; .ci/run installs it)")
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom import sop_class as sop  # noqa: E402

CALLER = "TESTSCU"


class Receiver:
    """A storage SCP standing in for the planning system: keeps what it is sent."""

    def __init__(self, ae_title: str = "PLANNING", ssl_context=None) -> None:
        self.ae_title, self.port, self.received, self.ssl_context = ae_title, free_port(), [], ssl_context
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(sop.RTStructureSetStorage)
        ae.add_supported_context(sop.SegmentationStorage)
        self.server = None
        self._ae = ae

    def start(self) -> "Receiver":
        def store(event):
            self.received.append(event.dataset)
            return 0x0000
        self.server = self._ae.start_server(("127.0.0.1", self.port), block=False,
                                            evt_handlers=[(evt.EVT_C_STORE, store)], ssl_context=self.ssl_context)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def mr_association(port: int, called: str = "TUMORSEG"):
    """An association offering MR Image Storage to the node (check ``is_established``)."""
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(sop.MRImageStorage)
    return ae.associate("127.0.0.1", port, ae_title=called)


def send_series(folder: Path, port: int, caller: str = CALLER, tls=None) -> list[int]:
    """C-STORE every file of ``folder`` to the node; the statuses ([] when not let in)."""
    ae = AE(ae_title=caller)
    ae.add_requested_context(sop.MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="TUMORSEG", tls_args=(tls, "127.0.0.1") if tls else None)
    if not assoc.is_established:
        return []
    try:
        return [assoc.send_c_store(pydicom.dcmread(p)).Status for p in sorted(folder.glob("*.dcm"))]
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A random-weight model on a 4 mm grid: contours somewhere, quickly."""
    return make_tiny_model(tmp_path_factory.mktemp("serve-model"), spacing=(4.0, 4.0, 4.0))


@pytest.fixture(scope="module")
def quiet_model(tmp_path_factory) -> Path:
    """A model that finds nothing: an empty RTSTRUCT, for the tests about delivery, not contours."""
    return make_tiny_model(tmp_path_factory.mktemp("serve-empty-model"), spacing=(4.0, 4.0, 4.0), background_bias=100.0)


@pytest.fixture
def series(tmp_path) -> Path:
    return small_real_series(tmp_path / "study")


class NodeProcess:
    def __init__(self, tmp_path: Path, model: Path, destinations: list[tuple[str, str, int]],
                 idle_seconds: float = 1.0, extra: str = "", port: int | None = None) -> None:
        self.port = port or free_port()
        self.spool = tmp_path / "spool"
        pipeline = tmp_path / "node-pipeline.toml"
        pipeline.write_text(f'model = "{model}"\n[preprocess]\nbrain_extraction = "off"\n[inference]\ntta = false\n')
        lines = ["[node]", 'ae_title = "TUMORSEG"', f"port = {self.port}", f'spool = "{self.spool}"',
                 f"idle_seconds = {idle_seconds}", f'pipeline = "{pipeline}"',
                 f'allowed_callers = ["{CALLER}", "STORESCU", "ORTHANC"]', "retry_seconds = 0.5", extra]
        for name, title, port in destinations:
            lines += ["[[destinations]]", f'name = "{name}"', f'ae_title = "{title}"', 'host = "127.0.0.1"',
                      f"port = {port}"]
        self.config = tmp_path / "node.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.log = tmp_path / "node.log"
        self.process = None

    def start(self) -> "NodeProcess":
        self.process = subprocess.Popen([sys.executable, "-m", "tumorseg.cli", "serve", "--config", str(self.config)],
                                        stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the node exited: {self.log.read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.2)
        raise AssertionError("the node did not listen within 60 s")

    def status(self) -> str:
        done = subprocess.run([sys.executable, "-m", "tumorseg.cli", "serve", "--config", str(self.config), "--status"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.process is None:
            return 0
        self.process.send_signal(sig)
        code = self.process.wait(timeout=120)
        self.process = None
        return code


def wait_for(condition, seconds: float = 120.0, what: str = "") -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def contours(ds) -> dict[str, list]:
    names = {r.ROINumber: r.ROIName for r in ds.StructureSetROISequence}
    return {names[c.ReferencedROINumber]: sorted(tuple(np.round(np.asarray(k.ContourData, float), 3))
                                                 for k in getattr(c, "ContourSequence", []))
            for c in ds.ROIContourSequence}


def assert_as_predict_writes(rt, series: Path, tmp_path: Path) -> None:
    """``rt`` is an RTSTRUCT of ``series``' study referencing that series, with the contours
    `tumorseg predict` writes for the same series and the node's pipeline file."""
    source = pydicom.dcmread(next(series.glob("*.dcm")), stop_before_pixels=True)
    assert rt.Modality == "RTSTRUCT" and rt.StudyInstanceUID == source.StudyInstanceUID
    referenced = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    out = tmp_path / "predict"
    done = subprocess.run([sys.executable, "-m", "tumorseg.cli", "predict", str(series), "-o", str(out), "-q",
                           "--pipeline", str(tmp_path / "node-pipeline.toml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert contours(rt) == contours(pydicom.dcmread(out / "rtstruct.dcm"))


def test_node_receives_segments_and_delivers_once(tmp_path, model, series):
    receiver = Receiver().start()
    node = NodeProcess(tmp_path, model, [("planning", receiver.ae_title, receiver.port)]).start()
    try:
        statuses = send_series(series, node.port)
        assert statuses and set(statuses) == {0x0000}
        wait_for(lambda: len(receiver.received) == 1, what="the RTSTRUCT")
        assert_as_predict_writes(receiver.received[0], series, tmp_path)
        assert "sent" in node.status()
        time.sleep(2)
        assert len(receiver.received) == 1  # delivered once
    finally:
        assert node.stop() == 0
        receiver.stop()
    log_text = node.log.read_text()
    assert CANARY not in log_text and "Traceback" not in log_text
    assert CANARY not in node.status()


def test_a_sender_pausing_within_one_association_gets_one_result(tmp_path, quiet_model, series):
    """Pauses longer than idle_seconds inside one open association made each part a complete study:
    segmented and delivered three times, the first two from part of the series."""
    receiver = Receiver().start()
    node = NodeProcess(tmp_path, quiet_model, [("planning", receiver.ae_title, receiver.port)]).start()
    try:
        assoc = mr_association(node.port)
        for n, path in enumerate(sorted(series.glob("*.dcm"))):
            assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
            if n in (3, 7):
                time.sleep(2.5)  # idle_seconds is 1
        assoc.release()
        wait_for(lambda: len(receiver.received) == 1, what="the RTSTRUCT")
        time.sleep(3)
        assert len(receiver.received) == 1 and " g1 " in node.status()
    finally:
        assert node.stop() == 0
        receiver.stop()


def test_unknown_caller_is_rejected_and_nothing_spooled(tmp_path, quiet_model, series):
    receiver = Receiver().start()
    node = NodeProcess(tmp_path, quiet_model, [("planning", receiver.ae_title, receiver.port)]).start()
    try:
        assert send_series(series, node.port, caller="INTRUDER") == []  # association rejected
        assert not any((node.spool / "studies").iterdir())
    finally:
        node.stop()
        receiver.stop()


def test_garbage_instance_is_refused_and_the_node_keeps_serving(tmp_path, quiet_model, series):
    receiver = Receiver().start()
    node = NodeProcess(tmp_path, quiet_model, [("planning", receiver.ae_title, receiver.port)]).start()
    try:
        assoc = mr_association(node.port)
        bad = pydicom.dcmread(next(series.glob("*.dcm")))
        bad.StudyInstanceUID = "1.2.3\\../../etc"  # two values, one a path
        status = assoc.send_c_store(bad)
        truncated = pydicom.dcmread(next(series.glob("*.dcm")))
        truncated.PixelData = truncated.PixelData[: len(truncated.PixelData) // 3]
        truncated_status = assoc.send_c_store(truncated)
        assoc.release()
        assert status.Status == 0xC000 and truncated_status.Status == 0xA900
        assert set(send_series(series, node.port)) == {0x0000}
        wait_for(lambda: len(receiver.received) == 1, what="the RTSTRUCT after a refused instance")
    finally:
        node.stop()
        receiver.stop()


def study_state(spool: Path) -> str:
    """The study's state, read from the node's job database directly (quick enough to catch 'running')."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{spool / 'jobs.sqlite'}?mode=ro", uri=True, timeout=1) as db:
            row = db.execute("SELECT state FROM studies").fetchone()
    except sqlite3.Error:
        return ""
    return row[0] if row else ""


def test_kill_while_receiving_and_while_segmenting_then_restart_delivers_once(tmp_path, quiet_model, series):
    receiver = Receiver().start()
    node = NodeProcess(tmp_path, quiet_model, [("planning", receiver.ae_title, receiver.port)], idle_seconds=5.0).start()
    files = sorted(series.glob("*.dcm"))
    first, rest = tmp_path / "first", tmp_path / "rest"
    first.mkdir(), rest.mkdir()
    for i, path in enumerate(files):
        shutil.copy(path, (first if i < len(files) // 2 else rest) / path.name)
    try:
        assert set(send_series(first, node.port)) == {0x0000}
        node.stop(signal.SIGKILL)  # while receiving: half the study spooled
        time.sleep(5.5)  # down longer than idle_seconds
        node.start()
        # The sender resumes a little later (once: the first half was complete at once on restart,
        # segmented and delivered on its own before the rest arrived).
        time.sleep(1.5)
        assert set(send_series(rest, node.port)) == {0x0000}
        seen = ""
        deadline = time.time() + 60
        while time.time() < deadline and seen != "running":
            seen = study_state(node.spool)
            time.sleep(0.02)
        assert seen == "running", f"never saw the study segmenting (last state {seen!r})"
        node.stop(signal.SIGKILL)  # while segmenting
        assert receiver.received == []
        node.start()
        wait_for(lambda: len(receiver.received) >= 1, what="the RTSTRUCT after two kills")
        time.sleep(2)
        assert len(receiver.received) == 1
        referenced = receiver.received[0].ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
            .RTReferencedSeriesSequence[0].ContourImageSequence
        assert len(referenced) == len(files)  # the whole study, both halves
    finally:
        node.stop()
        receiver.stop()


def test_destination_down_is_retried_until_it_is_up(tmp_path, quiet_model, series):
    receiver = Receiver()  # not listening yet
    node = NodeProcess(tmp_path, quiet_model, [("planning", receiver.ae_title, receiver.port)]).start()
    try:
        assert set(send_series(series, node.port)) == {0x0000}
        wait_for(lambda: "attempts" in node.status() or "pending" in node.status(), seconds=60, what="a failed send")
        receiver.start()
        wait_for(lambda: len(receiver.received) == 1, what="delivery after the destination came up")
        wait_for(lambda: "sent" in node.status(), seconds=10, what="the study marked sent")
    finally:
        node.stop()
        receiver.stop()


def test_destination_down_past_the_limit_fails_the_study_with_the_reason(tmp_path, quiet_model, series):
    node = NodeProcess(tmp_path, quiet_model, [("planning", "PLANNING", free_port())],
                       extra="send_attempts = 2").start()
    try:
        assert set(send_series(series, node.port)) == {0x0000}
        wait_for(lambda: "failed" in node.status(), seconds=60, what="the study marked failed")
        assert "not delivered to planning after 2 attempts" in node.status()
    finally:
        node.stop()


def test_config_errors_name_the_key(tmp_path):
    from click.testing import CliRunner

    from tumorseg.cli import main

    config = tmp_path / "node.toml"
    config.write_text('[node]\nallowed_callers = ["X"]\nport = 99999\n[[destinations]]\nname = "a"\n'
                      'ae_title = "A"\nhost = "h"\nport = 1\n')
    result = CliRunner().invoke(main, ["serve", "--config", str(config)])
    assert result.exit_code == 6 and "port" in result.output and "99999" in result.output
    config.write_text('[node]\nallowed_caller = ["X"]\n')
    result = CliRunner().invoke(main, ["serve", "--config", str(config)])
    assert result.exit_code == 6 and "allowed_callers" in result.output
    # TOML's nan and inf, and a host name where an address is meant: each would have loaded and then
    # stopped the node from segmenting, cleaning its spool, retrying or letting anyone in.
    destination = '[[destinations]]\nname = "a"\nae_title = "A"\nhost = "h"\nport = 1\n'
    for setting, key in (("idle_seconds = inf", "idle_seconds"), ("keep_days = nan", "keep_days"),
                         ("retry_seconds = inf", "retry_seconds"), ('allowed_hosts = ["pacs.example.org"]', "allowed_hosts")):
        config.write_text(f'[node]\nallowed_callers = ["X"]\n{setting}\n{destination}')
        result = CliRunner().invoke(main, ["serve", "--config", str(config)])
        assert result.exit_code == 6 and key in result.output, (setting, result.output)
    config.write_text('[node]\nallowed_callers = ["X"]\n' + destination.replace('host = "h"', 'host = ""'))
    result = CliRunner().invoke(main, ["serve", "--config", str(config)])  # once refused only at the first send
    assert result.exit_code == 6 and "host" in result.output, result.output


def test_allowed_hosts_take_addresses_and_networks():
    from tumorseg.serve.config import NodeSettings

    settings = NodeSettings(allowed_callers=("X",), allowed_hosts=("10.1.0.0/16", "192.168.2.7", "fd00::/8"))
    assert settings.host_allowed("10.1.200.3") and settings.host_allowed("192.168.2.7")
    assert settings.host_allowed("::ffff:10.1.0.9") and settings.host_allowed("fd00::1")
    assert not settings.host_allowed("10.2.0.1") and not settings.host_allowed("192.168.2.8")
    assert NodeSettings(allowed_callers=("X",)).host_allowed("203.0.113.5")  # none listed: all


def test_limits_hosts_and_sop_classes_are_refused_as_documented(tmp_path, quiet_model, series):
    receiver = Receiver().start()
    node = NodeProcess(tmp_path, quiet_model, [("planning", receiver.ae_title, receiver.port)],
                       extra="max_instance_mb = 0.01").start()
    try:
        assert set(send_series(series, node.port)) == {0xA700}  # each instance over 10 kB: out of resources
        ae = AE(ae_title=CALLER)
        ae.add_requested_context(sop.CTImageStorage)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="TUMORSEG")
        assert not assoc.is_established or not assoc.accepted_contexts  # CT: no presentation context
        if assoc.is_established:
            assoc.release()
        # MR offered in a syntax nothing here decodes first (MPEG2), then JPEG Lossless (decoded by
        # python-gdcm), then uncompressed: the node takes a syntax it can read, never the video.
        mpeg2, jpeg_lossless = "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.70"
        ae = AE(ae_title=CALLER)
        ae.add_requested_context(sop.MRImageStorage, [mpeg2])
        ae.add_requested_context(sop.MRImageStorage, [jpeg_lossless])
        ae.add_requested_context(sop.MRImageStorage, [pydicom.uid.ImplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", node.port, ae_title="TUMORSEG")
        assert assoc.is_established
        accepted = {str(c.transfer_syntax[0]) for c in assoc.accepted_contexts}
        assoc.release()
        assert accepted == {jpeg_lossless, pydicom.uid.ImplicitVRLittleEndian}
        # An association for another AE title is not the node's; a CT image sent over the MR
        # context was stored with success and failed later as 'modality CT'.
        assert not mr_association(node.port, called="NOTTUMORSEG").is_established
        assoc = mr_association(node.port)
        choose = assoc._get_valid_context  # a sender that puts a CT image on the MR context
        assoc._get_valid_context = lambda _, *args, **kwargs: choose(sop.MRImageStorage, *args, **kwargs)
        ct = pydicom.dcmread(sorted(series.glob("*.dcm"))[0])
        ct.SOPClassUID = sop.CTImageStorage
        ct.remove_private_tags()  # small: under max_instance_mb, so the class is what is judged
        ct.PixelData = ct.PixelData[:10]
        ct.Rows, ct.Columns = 1, 5
        status = assoc.send_c_store(ct).Status
        assoc.release()
        assert status == 0xA900
    finally:
        node.stop()
    node = NodeProcess(tmp_path / "hosts", quiet_model, [("planning", receiver.ae_title, receiver.port)],
                       extra='allowed_hosts = ["10.1.2.3"]') if (tmp_path / "hosts").mkdir() is None else None
    node.start()
    try:
        assert set(send_series(series, node.port)) <= set()  # from 127.0.0.1: not let in
        assert not any((node.spool / "studies").iterdir())
    finally:
        node.stop()
        receiver.stop()
    assert "not in allowed_hosts" in node.log.read_text()


def test_tls_with_a_self_signed_certificate(tmp_path, quiet_model, series):
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    server.load_verify_locations(cert)
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    client.load_verify_locations(cert)
    client.load_cert_chain(cert, key)
    receiver = Receiver(ssl_context=server).start()
    node = NodeProcess(tmp_path, quiet_model, [("planning", receiver.ae_title, receiver.port)],
                       extra=f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\nca_certificates = "{cert}"').start()
    try:
        assert send_series(series, node.port) == []  # plain TCP: no association
        assert set(send_series(series, node.port, tls=client)) == {0x0000}
        wait_for(lambda: len(receiver.received) == 1, what="the RTSTRUCT over TLS")
    finally:
        node.stop()
        receiver.stop()


def test_ten_studies_at_once_are_all_delivered(tmp_path, quiet_model, series):
    """Ten studies (copies of one, each with its own UIDs) sent by ten senders at once."""
    import threading

    studies = copy_as_new_studies(series, tmp_path, 10)
    receiver = Receiver().start()
    node = NodeProcess(tmp_path, quiet_model, [("planning", receiver.ae_title, receiver.port)],
                       extra="max_associations = 4").start()

    def send_with_retries(folder: Path) -> list[int]:
        """As a PACS does: an association rejected for the node's limit (transient) is tried again."""
        for _ in range(120):
            statuses = send_series(folder, node.port)
            if statuses:
                return statuses
            rejected.append(folder)
            time.sleep(0.5)
        return []

    rejected: list[Path] = []
    try:
        start = time.time()
        results = {}
        threads = [threading.Thread(target=lambda f=f: results.__setitem__(f, send_with_retries(f)))
                   for f in studies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(set(r) == {0x0000} for r in results.values()), results
        wait_for(lambda: len(receiver.received) == 10, seconds=300, what="ten RTSTRUCTs")
        print(f"10 studies of {len(list(series.glob('*.dcm')))} instances, 4 associations at most "
              f"({len(rejected)} rejected and retried): all delivered in {time.time() - start:.1f} s")
        assert len({r.StudyInstanceUID for r in receiver.received}) == 10
    finally:
        node.stop()
        receiver.stop()


# --- against a real PACS -----------------------------------------------------------------------

class Orthanc:
    def __init__(self, tmp_path: Path, node_port: int) -> None:
        if shutil.which("Orthanc") is None:
            pytest.skip("needs Orthanc (Debian package orthanc; .ci/run installs it)")
        self.http, self.dicom = free_port(), free_port()
        self.folder = tmp_path / "orthanc"
        self.folder.mkdir()
        config = {"Name": "tumorseg-test", "StorageDirectory": str(self.folder / "storage"),
                  "IndexDirectory": str(self.folder / "index"), "HttpPort": self.http, "DicomPort": self.dicom,
                  "DicomAet": "ORTHANC", "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                  "DicomModalities": {"tumorseg": ["TUMORSEG", "127.0.0.1", node_port]},
                  "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False, "Plugins": [],
                  "HttpServerEnabled": True, "StableAge": 1}
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        self.process = subprocess.Popen(["Orthanc", str(self.folder / "orthanc.json")],
                                        stdout=open(self.folder / "log.txt", "w"), stderr=subprocess.STDOUT)
        wait_for(lambda: self._up(), seconds=60, what="Orthanc")

    def _up(self) -> bool:
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as r:
            data = r.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def post(self, path: str, body: bytes):
        request = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=300) as r:
            data = r.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def rtstructs(self) -> list[str]:
        found = self.post("/tools/find", json.dumps({"Level": "Instance", "Query": {"Modality": "RTSTRUCT"}}).encode())
        return list(found)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)

    def restart(self) -> None:
        """Start again on the same configuration and storage (what it held is kept)."""
        self.process = subprocess.Popen(["Orthanc", str(self.folder / "orthanc.json")],
                                        stdout=open(self.folder / "log.txt", "a"), stderr=subprocess.STDOUT)
        wait_for(lambda: self._up(), seconds=60, what="Orthanc again")


def test_orthanc_sends_a_study_and_receives_the_rtstruct(tmp_path, model, series):
    """The issue's round trip: uploaded to Orthanc over REST, sent by Orthanc to the node
    (/modalities/tumorseg/store), the RTSTRUCT arrives back in Orthanc: 0 dciodvfy errors, the
    sent series referenced, the contours `predict` writes. dcmtk's storescu sends a second time."""
    node_port = free_port()
    orthanc = Orthanc(tmp_path, node_port)
    node = NodeProcess(tmp_path, model, [("pacs", "ORTHANC", orthanc.dicom)], port=node_port).start()
    try:
        ids = [orthanc.post("/instances", p.read_bytes())["ID"] for p in sorted(series.glob("*.dcm"))]
        series_id = orthanc.get(f"/instances/{ids[0]}")["ParentSeries"]
        start = time.time()
        orthanc.post("/modalities/tumorseg/store", json.dumps({"Resources": [series_id], "Synchronous": True}).encode())
        wait_for(lambda: len(orthanc.rtstructs()) == 1, what="the RTSTRUCT in Orthanc")
        print(f"Orthanc -> node -> Orthanc: {time.time() - start:.1f} s")
        rt_bytes = orthanc.get(f"/instances/{orthanc.rtstructs()[0]}/file")
        (tmp_path / "rt.dcm").write_bytes(rt_bytes)
        errors, _ = dicom3tools_findings(run_tool("dciodvfy", str(tmp_path / "rt.dcm")))
        assert errors == []
        assert_as_predict_writes(pydicom.dcmread(tmp_path / "rt.dcm"), series, tmp_path)
        # A second, independent sender: dcmtk's storescu sends the study again: a new generation,
        # a new RTSTRUCT series (docs/serve.md).
        if shutil.which("storescu"):
            done = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "TUMORSEG", "127.0.0.1", str(node_port),
                                   *map(str, sorted(series.glob("*.dcm")))], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            wait_for(lambda: len(orthanc.rtstructs()) == 2, what="the second RTSTRUCT")
            second = [pydicom.dcmread(__import__("io").BytesIO(orthanc.get(f"/instances/{i}/file")))
                      for i in orthanc.rtstructs()]
            assert len({r.SeriesInstanceUID for r in second}) == 2
    finally:
        node.stop()
        orthanc.stop()


def test_the_documented_example_config_loads():
    from tumorseg.serve.config import load_node_config

    config = load_node_config(Path(__file__).resolve().parents[1] / "docs" / "node.example.toml")
    assert config.node.allowed_callers == ("ORTHANC", "PACS01")
    assert [d.name for d in config.destinations] == ["planning", "pacs"]


def test_orthanc_down_when_the_node_sends_then_up_again_gets_the_rtstruct(tmp_path, quiet_model, series):
    node_port = free_port()
    orthanc = Orthanc(tmp_path, node_port)
    node = NodeProcess(tmp_path, quiet_model, [("pacs", "ORTHANC", orthanc.dicom)], port=node_port,
                       idle_seconds=6.0).start()
    try:
        ids = [orthanc.post("/instances", p.read_bytes())["ID"] for p in sorted(series.glob("*.dcm"))]
        series_id = orthanc.get(f"/instances/{ids[0]}")["ParentSeries"]
        orthanc.post("/modalities/tumorseg/store", json.dumps({"Resources": [series_id], "Synchronous": True}).encode())
        orthanc.stop()  # down before the node has segmented the study (idle_seconds 6)
        wait_for(lambda: "sending to pacs failed" in node.log.read_text(), seconds=90, what="a failed send to Orthanc")
        orthanc.restart()
        wait_for(lambda: len(orthanc.rtstructs()) == 1, what="the RTSTRUCT once Orthanc is back")
        wait_for(lambda: "sent" in node.status(), seconds=10, what="the study marked sent")
    finally:
        node.stop()
        orthanc.stop()


def test_sent_studies_leave_the_spool_after_keep_days(tmp_path, quiet_model, series):
    receiver = Receiver().start()
    node = NodeProcess(tmp_path, quiet_model, [("planning", receiver.ae_title, receiver.port)],
                       extra="keep_days = 0.00003").start()  # 2.6 s
    try:
        assert set(send_series(series, node.port)) == {0x0000}
        wait_for(lambda: len(receiver.received) == 1, what="the RTSTRUCT")
        assert any((node.spool / "studies").iterdir()) and any((node.spool / "results").iterdir())
        wait_for(lambda: not any((node.spool / "studies").iterdir()) and not any((node.spool / "results").iterdir()),
                 seconds=30, what="the study removed from the spool")
        assert node.status().strip() == "no studies"
        orphan = node.spool / "studies" / "1.2.3.4"  # left by a kill between the row and the files
        orphan.mkdir()
        wait_for(lambda: not orphan.exists(), seconds=30, what="an orphan folder removed")
    finally:
        node.stop()
        receiver.stop()



def test_a_destination_that_refuses_the_rtstruct_fails_the_study_and_the_node_keeps_serving(tmp_path, quiet_model,
                                                                                           series):
    """An SCP without RTSTRUCT storage: send_c_store raises, which once stopped the node on every start."""
    picky = AE(ae_title="PICKY")
    picky.add_supported_context(sop.SegmentationStorage)
    port = free_port()
    server = picky.start_server(("127.0.0.1", port), block=False)
    node = NodeProcess(tmp_path, quiet_model, [("picky", "PICKY", port)], extra="send_attempts = 2").start()
    try:
        assert set(send_series(series, node.port)) == {0x0000}
        wait_for(lambda: "failed" in node.status(), seconds=60, what="the study failed")
        assert "not delivered to picky after 2 attempts" in node.status()
        assert node.process.poll() is None  # still serving
        assert set(send_series(series, node.port)) == {0x0000}
    finally:
        node.stop()
        server.shutdown()


def test_job_store_rolls_back_a_failed_transaction(tmp_path):
    import sqlite3

    from tumorseg.serve.state import JobStore

    jobs = JobStore(tmp_path / "jobs.sqlite")
    jobs._db.execute("CREATE TRIGGER full BEFORE INSERT ON studies WHEN NEW.instances > 0 "
                     "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(sqlite3.IntegrityError):
        jobs.instance_received("1.2.3", 100)
    assert not jobs._db.in_transaction
    jobs._db.execute("DROP TRIGGER full")
    jobs.instance_received("1.2.3", 100)
    assert [s.instances for s in jobs.studies()] == [1]


def test_a_study_cut_off_by_a_restart_waits_a_full_idle_period_after_it(tmp_path):
    """The sender cannot send while the node is down: a study still being received when it stopped
    was once complete at once on restart (its last instance older than idle_seconds), so its first
    half was segmented and could be delivered before the sender resumed."""
    from tumorseg.serve.state import JobStore

    jobs = JobStore(tmp_path / "jobs.sqlite")
    jobs.instance_received("1.2.3", 100)
    jobs._db.execute("UPDATE studies SET last_instance = last_instance - 600")  # the node down 10 minutes
    jobs.restart_idle_clocks()
    assert jobs.mark_complete(idle_seconds=60) == []
    assert [s.study_uid for s in jobs.mark_complete(idle_seconds=0)] == ["1.2.3"]
    jobs.restart_idle_clocks()  # a complete study is not reopened
    assert [s.state for s in jobs.studies()] == ["complete"]


def test_an_instance_sent_again_counts_once_and_a_study_sent_again_starts_afresh(tmp_path):
    """A PACS that resends a study after an interrupted association replaces its files: they were
    counted again, so max_study_mb refused good instances; and a study already sent was refused
    whole when sent again, its finished generation's bytes counted against the new one."""
    from tumorseg.serve.spool import Spool
    from tumorseg.serve.state import JobStore

    spool, jobs = Spool(tmp_path / "spool"), JobStore(tmp_path / "jobs.sqlite")
    for _ in range(2):  # the same instance twice
        replaced = spool.stored_size("1.2.3", "1.2.3.4", "1.2.3.4.5")
        spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", b"x" * 100)
        jobs.instance_received("1.2.3", 100, replaced)
    assert [(s.instances, s.bytes) for s in jobs.studies()] == [(1, 100)] and jobs.study_bytes("1.2.3") == 100
    jobs.mark_complete(idle_seconds=0)
    assert jobs.study_bytes("1.2.3") == 0  # past receiving: a new generation would start from nothing


def test_a_study_an_open_association_is_sending_is_not_complete(tmp_path):
    """A sender pausing longer than idle_seconds within one association had each part segmented
    and delivered (three RTSTRUCTs for one study); after an abort the study waits afresh."""
    from tumorseg.serve.state import JobStore

    jobs = JobStore(tmp_path / "jobs.sqlite")
    jobs.instance_received("1.2.3", 100)
    jobs._db.execute("UPDATE studies SET last_instance = last_instance - 600")
    assert jobs.mark_complete(idle_seconds=60, still_open={"1.2.3"}) == []
    assert jobs.restart_idle_clock("1.2.3")  # the association was aborted
    assert jobs.mark_complete(idle_seconds=60) == []
    assert [s.study_uid for s in jobs.mark_complete(idle_seconds=0)] == ["1.2.3"]


def test_spool_writes_partial_files_outside_the_study_and_sweeps_them(tmp_path):
    from tumorseg.serve.spool import Spool

    spool = Spool(tmp_path / "spool")
    (spool.root / "tmp" / "left-by-a-kill.dcm").write_bytes(b"half")
    spool = Spool(tmp_path / "spool")  # a restart
    assert not any((spool.root / "tmp").iterdir())
    path = spool.store("1.2.3", "1.2.3.4", "1.2.3.4.5", b"DICM")
    assert [p.read_bytes() for p in path.parent.iterdir()] == [b"DICM"]
    with pytest.raises(ValueError):
        spool.store("1.2.3", "../etc", "1.2", b"x")


def test_spool_names_hold_no_uid_and_an_old_spool_is_renamed_without_loss(tmp_path):
    """A vendor's UID may encode the acquisition date (Siemens: ...2012021516011634767289): the
    spool's folder and file names were the UIDs until 2026-12-08."""
    from tumorseg.serve.spool import Spool

    study = "1.3.12.2.1107.5.2.32.35162.30000012021507"
    series, sop = study + ".2012021516011634767289", study + ".2012021516011634767290"
    spool = Spool(tmp_path / "new")
    path = spool.store(study, series, sop, b"DICM new")
    named = [p.relative_to(spool.root).as_posix() for p in spool.root.rglob("*")]
    assert not any("2012" in name or "." in name.removesuffix(".dcm") for name in named), named
    assert path.parent.parent == spool.study_folder(study)

    old = tmp_path / "old" / "studies" / study / series  # the layout before 2026-12-08
    old.mkdir(parents=True)
    (old / f"{sop}.dcm").write_bytes(b"DICM old")
    (old.parent / "1.2.3").mkdir()  # an empty series folder
    spool = Spool(tmp_path / "old")  # the node starts on it
    assert spool._instance_path(study, series, sop).read_bytes() == b"DICM old"
    assert spool.stored_size(study, series, sop) == 8  # a re-sent instance still counts once
    assert [p.name for p in (spool.root / "studies").iterdir()] == [spool.study_folder(study).name]


def test_a_study_whose_series_cannot_be_chosen_fails_with_the_reason(tmp_path, quiet_model, series):
    """Nobody is there to type --t1: an unrecognised series fails the study, nothing is guessed or sent."""
    for path in series.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = ds.ProtocolName = "zz site seq 7"
        ds.save_as(path)
    receiver = Receiver().start()
    node = NodeProcess(tmp_path, quiet_model, [("planning", receiver.ae_title, receiver.port)]).start()
    try:
        assert set(send_series(series, node.port)) == {0x0000}
        wait_for(lambda: "failed" in node.status(), seconds=60, what="the study failed")
        assert "recognised" in node.status() and "<UID>" not in node.status().split("failed", 1)[0]
        assert receiver.received == []
    finally:
        node.stop()
        receiver.stop()
