"""The node: a storage SCP that spools what the PACS sends, a worker that segments complete studies
through the pipeline, and a sender that delivers each result once to every destination."""
from __future__ import annotations

import io
import logging
import re
import signal
import sqlite3
import ssl
import threading
import time
from pathlib import Path

from ..errors import ConfigError, TumorsegError
from .config import Destination, NodeConfig
from .spool import Spool
from .state import JobStore, Study, study_key

log = logging.getLogger(__name__)

# DICOM statuses (PS3.4 Annex B, PS3.7 Annex C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
DATA_SET_DOES_NOT_MATCH = 0xA900
REFUSED_NOT_AUTHORISED = 0x0124
#: What the node accepts: MR images (slice files and enhanced multi-frame). Anything else is
#: refused at association (no presentation context), as a PACS administrator expects.
ACCEPTED_SOP_CLASSES = ("MRImageStorage", "EnhancedMRImageStorage")
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
RESULTS = {"rtstruct": "rtstruct.dcm", "seg": "seg.dcm"}


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.settings = config.node
        self.spool = Spool(config.spool)
        self.jobs = JobStore(config.spool / "jobs.sqlite")
        self.stopping = threading.Event()
        self.server = None
        self._segmenter = None
        self._next_cleanup = 0.0
        self._spool_lock = threading.Lock()
        # Studies each open association has stored to: none is complete while one is still open.
        self._receiving: dict[int, set[str]] = {}
        self._receiving_lock = threading.Lock()

    # --- lifecycle -------------------------------------------------------------------------
    def run(self, poll_seconds: float = 0.5) -> None:
        """Serve until SIGTERM or SIGINT; the step in progress (a segmentation, a send) finishes first."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        recovered = self.jobs.recover()
        if recovered:
            log.info("resuming %d study(ies) that were being segmented when the node stopped", recovered)
        self._load_pipeline()
        self.start_scp()
        if self.jobs.restart_idle_clocks():
            log.info("studies cut off when the node stopped wait %g s for the rest of their instances",
                     self.settings.idle_seconds)
        log.info("listening as %s on %s:%d; spool %s", self.settings.ae_title, self.settings.host,
                 self.settings.port, self.config.spool)
        try:
            while not self.stopping.is_set():
                if not self.step():
                    self.stopping.wait(poll_seconds)
        finally:
            if self.server is not None:
                # Associations still sending are aborted (the sender sends again later): none may
                # store once the job database is closed.
                for assoc in list(self.server.active_associations):
                    assoc.abort()
                self.server.shutdown()
            self.jobs.close()
            log.info("stopped")

    def step(self) -> bool:
        """One unit of work (mark quiet studies complete, send one result, or segment one study);
        False when idle. Sending first: a result waits for no other study's segmentation."""
        with self._receiving_lock:
            open_studies = set().union(*self._receiving.values())
        for study in self.jobs.mark_complete(self.settings.idle_seconds, still_open=open_studies):
            log.info("study %s complete: %d instance(s)", study.key, study.instances)
        due = self.jobs.due_deliveries()
        if due:
            self.deliver(*due[0])
            return True
        study = self.jobs.next_complete()
        if study is not None:
            self.segment(study)
            return True
        if self.settings.keep_days and time.time() >= self._next_cleanup:
            self._next_cleanup = time.time() + min(60.0, self.settings.keep_days * 86400 / 2)
            self.clean_up()
        return False

    def clean_up(self) -> None:
        """Remove studies sent or failed more than ``keep_days`` ago, and files no row points to
        (a kill between the two steps). Under the spool lock, so no instance being stored is lost."""
        import shutil

        with self._spool_lock:
            for study in self.jobs.expired(self.settings.keep_days * 86400):
                # Files first: a kill before the row goes leaves a row without files (removed next
                # pass), never stale results that a re-sent study's generation 1 would reuse.
                shutil.rmtree(self.spool.study_folder(study.study_uid), ignore_errors=True)
                shutil.rmtree(self.spool.root / "results" / study.key, ignore_errors=True)
                if self.jobs.forget(study):
                    log.info("study %s: removed from the spool (%s more than %g days ago)", study.key, study.state,
                             self.settings.keep_days)
            rows = self.jobs.studies()
            known = {self.spool.study_folder(s.study_uid).name for s in rows}
            for folder in (self.spool.root / "studies").iterdir():
                if folder.name not in known:
                    shutil.rmtree(folder, ignore_errors=True)
            keys = {s.key for s in rows}
            for folder in (self.spool.root / "results").iterdir():
                if folder.name not in keys:
                    shutil.rmtree(folder, ignore_errors=True)

    def _load_pipeline(self):
        if self._segmenter is None:
            from dataclasses import replace

            from ..config import load_pipeline
            from ..pipeline import Segmenter

            file = self.config.path(self.settings.pipeline)  # a file beside node.toml, else a bundled name
            config = load_pipeline(file if file.is_file() else self.settings.pipeline)
            config = replace(config, output=replace(config.output, rtstruct=True, seg=self.settings.send_seg))
            self._segmenter = Segmenter(config.model, config)
        return self._segmenter

    # --- receiving -------------------------------------------------------------------------
    def start_scp(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom import sop_class as sop

        from ..dicom.files import can_decode

        ae = AE(ae_title=self.settings.ae_title)
        ae.add_supported_context(sop.Verification)
        # Only what can be decoded here: a sender that offers another syntax first then falls back
        # to one of these (or transcodes), instead of a study that is stored and then fails.
        # JPEG Extended is left out: GDCM cannot decode its 12-bit form, MR's usual depth.
        decodable = [syntax for syntax in ALL_TRANSFER_SYNTAXES if can_decode(syntax) and syntax != JPEG_EXTENDED]
        for name in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(getattr(sop, name), decodable)
        ae.require_calling_aet = list(self.settings.allowed_callers)
        ae.require_called_aet = True  # an association for another AE title is not ours
        ae.maximum_associations = self.settings.max_associations
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_REQUESTED, self._on_requested), (evt.EVT_RELEASED, self._on_closed),
                    (evt.EVT_ABORTED, self._on_aborted), (evt.EVT_CONN_CLOSE, self._on_closed)]
        try:
            self.server = ae.start_server((self.settings.host, self.settings.port), block=False,
                                          evt_handlers=handlers, ssl_context=self._server_tls())
        except OSError as e:
            raise ConfigError(f"cannot listen on {self.settings.host}:{self.settings.port} ({e.strerror}); "
                              "check [node] host and port") from None

    def _on_requested(self, event) -> None:
        address = event.assoc.requestor.address
        if not self.settings.host_allowed(address):
            log.warning("refused an association from %s: not in allowed_hosts", address)
            event.assoc.abort()

    def _on_echo(self, event) -> int:
        return SUCCESS

    def _on_closed(self, event) -> None:
        with self._receiving_lock:
            self._receiving.pop(id(event.assoc), None)

    def _on_aborted(self, event) -> None:
        """A sender cut off mid-study sends again: the studies it was storing wait a full idle
        period from now rather than from their last instance."""
        with self._receiving_lock:
            studies = self._receiving.pop(id(event.assoc), set())
        for study_uid in studies:
            if self.jobs.restart_idle_clock(study_uid):
                log.warning("study %s: the association sending it was aborted; waiting %g s for the rest",
                            study_key(study_uid), self.settings.idle_seconds)

    def _on_store(self, event) -> int:
        import pydicom

        try:
            data = event.encoded_dataset()
        except Exception:
            log.warning("refused an instance that could not be decoded")
            return CANNOT_UNDERSTAND
        if len(data) > self.settings.max_instance_mb * 2**20:
            log.warning("refused an instance of %.0f MB (max_instance_mb %g)", len(data) / 2**20,
                        self.settings.max_instance_mb)
            return OUT_OF_RESOURCES
        try:
            header = pydicom.dcmread(io.BytesIO(data))  # once, whole: the pixel check below reads it too
            study_uid = str(header.StudyInstanceUID)
            series_uid = str(header.SeriesInstanceUID)
            sop_uid = str(header.SOPInstanceUID)
        except Exception:
            log.warning("refused an instance whose header cannot be parsed or lacks its UIDs")
            return CANNOT_UNDERSTAND
        if sop_uid != str(event.request.AffectedSOPInstanceUID):
            log.warning("refused an instance whose SOP Instance UID differs from the request's")
            return CANNOT_UNDERSTAND
        sop_class = str(header.get("SOPClassUID", ""))
        if not sop_class == str(event.request.AffectedSOPClassUID) == str(event.context.abstract_syntax):
            log.warning("refused an instance whose SOP class differs from the presentation context's")
            return DATA_SET_DOES_NOT_MATCH
        if not _pixel_data_complete(header):
            log.warning("study %s: refused an instance whose pixel data is missing or cut short", study_key(study_uid))
            return DATA_SET_DOES_NOT_MATCH
        with self._receiving_lock:
            self._receiving.setdefault(id(event.assoc), set()).add(study_uid)
        try:
            with self._spool_lock:  # the file and its row together (see clean_up)
                replaced = self.spool.stored_size(study_uid, series_uid, sop_uid)
                if self.jobs.study_bytes(study_uid) + len(data) - replaced > self.settings.max_study_mb * 2**20:
                    log.warning("study %s: refused an instance past max_study_mb %g", study_key(study_uid),
                                self.settings.max_study_mb)
                    return OUT_OF_RESOURCES
                self.spool.store(study_uid, series_uid, sop_uid, data)
                self.jobs.instance_received(study_uid, len(data), replaced)
        except ValueError:
            log.warning("refused an instance whose UIDs are not valid DICOM UIDs")
            return CANNOT_UNDERSTAND
        except (OSError, sqlite3.Error) as e:
            log.error("cannot write to the spool or its database (%s): instance refused",
                      getattr(e, "strerror", None) or type(e).__name__)
            return OUT_OF_RESOURCES
        return SUCCESS

    # --- segmenting ------------------------------------------------------------------------
    def segment(self, study: Study) -> None:
        from ..inputs import DicomInputs
        from ..pipeline import write_outputs

        out = self.spool.results_folder(study.key, study.generation)
        start = time.perf_counter()
        try:
            if not (out / "report.json").is_file():  # written last: present means the set is complete
                segmenter = self._load_pipeline()
                result = segmenter.segment_inputs(DicomInputs(folders=(self.spool.study_folder(study.study_uid),)))
                out.mkdir(parents=True, exist_ok=True)
                write_outputs(result, segmenter.spec, out)
        except TumorsegError as e:
            reason = _without_uids(str(e))
            log.warning("study %s: failed: %s", study.key, reason)
            self.jobs.fail(study, reason)
            return
        except Exception as e:  # a bug: the study fails, the node keeps serving
            log.error("study %s: internal error %s (a bug: the traceback is logged with --verbose)", study.key,
                      type(e).__name__)
            log.debug("traceback", exc_info=True)
            self.jobs.fail(study, f"internal error: {type(e).__name__}")
            return
        if self.jobs.finish(study, [d.name for d in self.config.destinations]):
            log.info("study %s: segmented in %.1f s; sending to %s", study.key, time.perf_counter() - start,
                     ", ".join(d.name for d in self.config.destinations))
        else:
            log.info("study %s: more instances arrived while it was segmented; it runs again", study.key)

    # --- sending ---------------------------------------------------------------------------
    def deliver(self, study_uid: str, generation: int, name: str, attempts: int) -> None:
        key = study_key(study_uid)
        destination = next((d for d in self.config.destinations if d.name == name), None)
        folder = self.spool.results_folder(key, generation)
        files = [folder / RESULTS["rtstruct"]] + ([folder / RESULTS["seg"]] if self.settings.send_seg else [])
        if destination is None:  # removed from the configuration since: nowhere to retry
            reason, attempts = f"destination {name!r} is no longer configured", self.settings.send_attempts
        elif not all(p.is_file() for p in files):
            reason, attempts = "the result to send is missing (send_seg switched on after it was made?)", \
                self.settings.send_attempts
        else:
            try:
                reason = self.send(destination, files)
            except Exception as e:  # a peer that refuses a context, aborts mid-way ...: a failed attempt
                reason = f"{type(e).__name__}: {_without_uids(str(e))}"
        if reason is None:
            self.jobs.delivered(study_uid, generation, name)
            log.info("study %s: delivered to %s", key, name)
            return
        last = self.jobs.delivery_failed(study_uid, generation, name, reason, attempts, self.settings.send_attempts,
                                         self.settings.retry_seconds)
        if last:
            log.error("study %s: not delivered to %s after %d attempts (%s): failed", key, name,
                      self.settings.send_attempts, reason)
        else:
            log.warning("study %s: sending to %s failed (%s); retrying in %.0f s", key, name, reason,
                        self.settings.retry_seconds * 2 ** attempts)

    def send(self, destination: Destination, files: list[Path]) -> str | None:
        """C-STORE ``files`` in one association; None on success, else why not. A retry sends the
        same files, so the same SOP Instance UIDs: a destination never gets two different objects."""
        import pydicom
        from pynetdicom import AE
        from pynetdicom import sop_class as sop
        from pynetdicom.status import code_to_category

        ae = AE(ae_title=self.settings.ae_title)
        ae.add_requested_context(sop.RTStructureSetStorage)
        ae.add_requested_context(sop.SegmentationStorage)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        tls = self._client_tls()
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             tls_args=(tls, destination.host) if tls else None)
        if not assoc.is_established:
            return "association rejected, aborted or destination unreachable"
        try:
            for path in files:
                status = assoc.send_c_store(pydicom.dcmread(path))
                code = getattr(status, "Status", None)
                if code is None or code_to_category(code) not in ("Success", "Warning"):
                    return f"C-STORE of {path.name} answered {'no status' if code is None else f'0x{code:04X}'}"
        finally:
            if assoc.is_established:
                assoc.release()
        return None

    # --- TLS -------------------------------------------------------------------------------
    def _server_tls(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config.path(tls.certificate), self.config.path(tls.key))
        if tls.ca_certificates:
            context.load_verify_locations(self.config.path(tls.ca_certificates))
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _client_tls(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if tls is None:
            return None
        # With ca_certificates, destinations are verified against it alone, not the system's CAs.
        ca = self.config.path(tls.ca_certificates) if tls.ca_certificates else None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        context.load_cert_chain(self.config.path(tls.certificate), self.config.path(tls.key))
        return context


def _pixel_data_complete(ds) -> bool:
    """The instance holds pixel data, and uncompressed pixel data as long as Rows x Columns x
    frames x BitsAllocated say (a truncated instance is refused now, not when its study runs)."""
    import pydicom

    try:
        if "PixelData" not in ds:
            return False
        syntax = ds.file_meta.get("TransferSyntaxUID", None)
        if syntax is not None and pydicom.uid.UID(syntax).is_compressed:
            return len(ds.PixelData) > 0
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        expected = int(ds.Rows) * int(ds.Columns) * frames * int(ds.BitsAllocated) // 8 * int(ds.get("SamplesPerPixel", 1))
        return len(ds.PixelData) >= expected
    except Exception:
        return False


_UID_TEXT = re.compile(r"\d+(?:\.\d+){3,}")


def _without_uids(message: str) -> str:
    """A reason for the status and the log: UIDs (spool paths are made of them; some encode the
    acquisition date and time) replaced by ``<UID>``."""
    return _UID_TEXT.sub("<UID>", message)


def status_lines(config: NodeConfig) -> list[str]:
    """The queue without patient data: study key, state, generation, instances, deliveries, reason."""
    path = config.spool / "jobs.sqlite"
    if not path.is_file():
        return [f"no job database in {config.spool} (the node has not run yet)"]
    jobs = JobStore(path)
    try:
        lines = []
        for s in jobs.studies():
            sent = ", ".join(f"{d}: {state}" + (f" ({n} attempts)" if n > 1 else "")
                             for g, d, state, n, _ in jobs.deliveries(s.study_uid) if g == s.generation)
            lines.append(f"{s.key}  {s.state:9s} g{s.generation}  {s.instances:5d} instances  "
                         f"{sent or '-'}" + (f"  {s.reason}" if s.reason else ""))
        return lines or ["no studies"]
    finally:
        jobs.close()
