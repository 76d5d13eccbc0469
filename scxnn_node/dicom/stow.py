"""STOW-RS delivery of the SR and summary image to a DICOMweb service (dicomweb-client): one
POST per file, and a file counts as sent only when the server's answer names it as stored."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from requests.adapters import HTTPAdapter
from requests.models import PreparedRequest
from urllib3.exceptions import NewConnectionError

from scxnn_node.config import DicomWebDestination
from scxnn_node.store.results import Attempt, DueDelivery
from scxnn_node.store.spool import Spool

# Each file goes in one request with a Content-Length: chunked uploads are refused by some
# servers and proxies, and our outputs are a few MB at most.
_CHUNK_BYTES = 1 << 30


class _PinnedCa(HTTPAdapter):
    """Verifies https against one CA file whatever the environment says: requests lets
    REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE replace a session's own `verify`, which would quietly
    unpin the CA (psf/requests#3829)."""

    def __init__(self, ca: str) -> None:
        super().__init__()
        self.ca = ca

    def send(self, request: PreparedRequest, **kwargs: Any) -> requests.Response:
        kwargs["verify"] = self.ca
        return super().send(request, **kwargs)


class Unreachable(Exception):
    """The service cannot be reached or does not answer: every other file would fail the same
    way (and wait out the same timeout)."""


class DicomWebSender:
    """STOW-RS of each due file to one DICOMweb destination; an attempt per item, never an
    exception. A file the server refuses, or does not confirm, fails only its own delivery."""

    def __init__(self, destination: DicomWebDestination, spool: Spool) -> None:
        self.destination = destination
        self.spool = spool

    def send(self, items: list[DueDelivery]) -> list[Attempt]:
        try:
            session = self._session()
        except Exception as exc:  # no password in the environment, say: nothing can be sent
            return [Attempt(item.id, _reason(exc)) for item in items]
        attempts: list[Attempt] = []
        responses: list[requests.Response] = []
        with session:
            client = DICOMwebClient(
                self.destination.url,
                session=session,
                timeout=self.destination.timeout_seconds,
                chunk_size=_CHUNK_BYTES,
                callback=lambda response, *args, **kwargs: responses.append(response),
            )
            # The delivery queue retries with its own backoff; the client must not wait here.
            client.set_http_retry_params(retry=False)
            for index, item in enumerate(items):
                try:
                    failure = self._store(client, item, responses)
                except Unreachable as exc:
                    attempts.extend(Attempt(rest.id, str(exc)) for rest in items[index:])
                    break
                except Exception as exc:  # e.g. an unreadable file: it must not fail the others
                    failure = _reason(exc)
                attempts.append(Attempt(item.id, failure))
        return attempts

    def _session(self) -> requests.Session:
        d = self.destination
        session = requests.Session()
        session.verify = True  # always on: the system CAs, or ca alone when set
        if d.ca is not None:
            session.verify = str(d.ca)
            session.mount("https://", _PinnedCa(str(d.ca)))
        if d.certificate is not None and d.key is not None:
            session.cert = (str(d.certificate), str(d.key))
        if d.username is not None and d.password_env is not None:
            password = os.environ.get(d.password_env)
            if password is None:
                session.close()
                raise LookupError(
                    f"environment variable {d.password_env} is not set (the password of "
                    f"{d.username} at {d.name})"
                )
            session.auth = (d.username, password)
        return session

    def _store(
        self, client: DICOMwebClient, item: DueDelivery, responses: list[requests.Response]
    ) -> str | None:
        """None when the server says it stored the file, otherwise why not."""
        dataset = pydicom.dcmread(self.spool.absolute(item.path))
        sop_instance_uid = str(dataset.SOPInstanceUID)
        responses.clear()
        try:
            answer = client.store_instances([dataset])
            if not answer and responses:  # the client reads only a bare media type
                answer = _json_answer(responses[-1])
        except requests.HTTPError as exc:
            return _http_failure(exc.response, sop_instance_uid)
        except (requests.ConnectionError, requests.Timeout) as exc:
            why = self._connection_failure(exc)
            # Not connected, or connected to a server that says nothing: the next file fares
            # no better. A connection dropped during this one file fails only this file.
            if _not_connected(exc) or isinstance(exc, requests.Timeout):
                raise Unreachable(why) from exc
            return why
        except ValueError as exc:  # a body in a DICOM media type that is not DICOM JSON/XML
            return f"unreadable STOW-RS response ({exc})"
        return _answer_failure(answer, sop_instance_uid)

    def _connection_failure(self, exc: requests.RequestException) -> str:
        seconds = f"{self.destination.timeout_seconds:g} s"
        if isinstance(exc, requests.ConnectTimeout):
            return f"no connection within {seconds}"
        if isinstance(exc, requests.Timeout):
            return f"no answer within {seconds}"
        if isinstance(exc, requests.exceptions.SSLError):
            return f"TLS failed: {_innermost(exc)}"
        if any(isinstance(cause, ConnectionRefusedError) for cause in _causes(exc)):
            return "connection refused"
        return f"connection failed: {_innermost(exc)}"


def _not_connected(exc: requests.RequestException) -> bool:
    """The request never reached the server: no connection, no name, or no TLS handshake."""
    if isinstance(exc, (requests.ConnectTimeout, requests.exceptions.SSLError)):
        return True
    return any(isinstance(cause, NewConnectionError) for cause in _causes(exc))


def _answer_failure(answer: Dataset, sop_instance_uid: str) -> str | None:
    """Why a STOW-RS answer does not show the instance stored (None: it does)."""
    for failed in answer.get("FailedSOPSequence", []):
        if failed.get("ReferencedSOPInstanceUID") == sop_instance_uid:
            return f"refused: {_failure_reason(failed)}"
    for stored in answer.get("ReferencedSOPSequence", []):
        if stored.get("ReferencedSOPInstanceUID") == sop_instance_uid:
            return None  # a WarningReason still means stored (coerced, say)
    return "the server did not confirm storing it (no ReferencedSOPSequence item names it)"


def _json_answer(response: requests.Response) -> Dataset:
    """The DICOM JSON body of an answer whose media type has parameters (`; charset=utf-8`)."""
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media_type in ("application/dicom+json", "application/json") and response.content:
        return Dataset.from_json(response.json())
    return Dataset()


def _http_failure(response: requests.Response | None, sop_instance_uid: str) -> str:
    """`HTTP 409 Conflict`, with the failure reason when the body names the instance."""
    if response is None:
        return "HTTP error without a response"
    text = f"HTTP {response.status_code} {response.reason or ''}".rstrip()
    try:
        body = Dataset.from_json(response.json())
    except Exception:  # an error page, or nothing: the status says enough
        return text
    for failed in body.get("FailedSOPSequence", []):
        if failed.get("ReferencedSOPInstanceUID") == sop_instance_uid:
            return f"{text}: refused: {_failure_reason(failed)}"
    return text


def _failure_reason(item: Dataset) -> str:
    """PS3.18 FailureReason as hex (0xA700 out of resources, 0xC000 cannot understand...)."""
    reason = item.get("FailureReason")
    return f"FailureReason 0x{int(reason):04X}" if reason is not None else "no FailureReason"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what it wraps: requests -> urllib3 -> the socket's OSError."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [current.__cause__, current.__context__, getattr(current, "reason", None)]
        wrapped += list(current.args)
        pending.extend(w for w in wrapped if isinstance(w, BaseException))


def _innermost(exc: BaseException) -> str:
    """The last wrapped error reached: the socket's or TLS's own words, not a wrapper's."""
    *_, last = _causes(exc)
    return f"{type(last).__name__}: {last}"


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
