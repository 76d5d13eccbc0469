"""The status page as HTML: queue and workers, the last studies, deliveries not sent (with a
retry form when a token is configured), drift and disk. Every value is escaped; the data comes
from NodeView already hashed and redacted. No JavaScript: a meta refresh reloads it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from html import escape
from typing import Any

from scxnn_node.drift import describe_statistic
from scxnn_node.http.view import DeliveryLine, StudyLine
from scxnn_node.model.manifest import Manifest

REFRESH_SECONDS = 15

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2733;background:#f6f7f9}
h1{font-size:20px;margin:0 0 .2em}h2{font-size:16px;margin:1.4em 0 .4em}
table{border-collapse:collapse;background:#fff;min-width:40%}
th,td{border:1px solid #d4d9e0;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#e9edf2}.muted{color:#65707d}.bad{color:#a4161a;font-weight:600}
.ok{color:#2b7a0b}code{font-size:13px}form{display:inline;margin:0}
.note{background:#fff8d6;border:1px solid #e5d48a;padding:6px 10px;display:inline-block}
"""


def render_status_page(
    *,
    status: dict[str, Any],
    studies: Sequence[StudyLine],
    deliveries: Sequence[DeliveryLine],
    free_bytes: int,
    min_free_bytes: int,
    manifest: Manifest,
    retry_enabled: bool,
    now: datetime,
    message: str = "",
) -> str:
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        "<title>scxnn-node status</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>scxnn-node</h1>",
        f"<div class=muted>bundle {_e(manifest.name)} {_e(manifest.version)}"
        + (" <span class=bad>DEMO: NOT FOR CLINICAL USE</span>" if manifest.demo else "")
        + f" &middot; {_e(now.strftime('%Y-%m-%d %H:%M:%S'))} UTC &middot; refreshes every "
        f"{REFRESH_SECONDS} s &middot; identifiers are hashed</div>",
    ]
    if message:
        parts.append(f"<p class=note>{_e(message)}</p>")
    parts += _queue(status)
    parts += _workers(status["workers"])
    parts += _studies(studies)
    parts += _deliveries(deliveries, retry_enabled)
    parts += _errors(status["last_errors"])
    parts += _drift(status.get("drift"))
    parts += _disk(free_bytes, min_free_bytes)
    parts.append("</body></html>")
    return "\n".join(parts)


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], empty: str) -> list[str]:
    """Cells are HTML already (escaped by the caller)."""
    body = ["<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows]
    if not body:
        return [f"<p class=muted>{_e(empty)}</p>"]
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr>"
    return ["<table>", head, *body, "</table>"]


def _queue(status: dict[str, Any]) -> list[str]:
    rows = []
    for name in ("instances", "studies", "jobs", "deliveries"):
        counts = status[name]
        text = ", ".join(
            (
                f"<span class=bad>{_e(state)} {n}</span>"
                if state in ("dead", "failed") and n
                else f"{_e(state)} {n}"
            )
            for state, n in sorted(counts.items())
        )
        rows.append([_e(name), text or "<span class=muted>none</span>"])
    oldest = status["oldest_waiting_study"]
    rows.append(
        [
            "oldest waiting study",
            "<span class=muted>none</span>"
            if oldest is None
            else f"<code>{_e(oldest['study'])}</code> for {oldest['waiting_seconds']:.0f} s",
        ]
    )
    return ["<h2>Queue</h2>", *_table(["", "by state"], rows, "")]


def _workers(workers: list[dict[str, Any]]) -> list[str]:
    rows = [
        [
            f"<code>{_e(w['owner'])}</code>",
            _e(w["device"]),
            _e(w["bundle_version"]),
            "idle" if w["job"] is None else f"job {_e(w['job'])}",
            f"{w['beat_seconds_ago']:.0f} s ago",
            f"{w['engine_seconds']:.0f} s",
            f"{w['decode_wait_seconds']:.0f} s",
        ]
        for w in workers
    ]
    return [
        "<h2>Workers</h2>",
        *_table(
            [
                "worker",
                "device",
                "bundle",
                "doing",
                "last beat",
                "engine ran",
                "engine waited for decoding",
            ],
            rows,
            "No worker alive: nothing is being analysed.",
        ),
    ]


def _studies(studies: Sequence[StudyLine]) -> list[str]:
    rows = [
        [
            f"<code>{_e(s.study)}</code>",
            _e(s.state),
            _e(s.verdict) or "<span class=muted>-</span>",
            _e(s.risk_tier) or "<span class=muted>-</span>",
            "<span class=muted>-</span>"
            if s.latency_seconds is None
            else f"{s.latency_seconds:.1f} s",
            _e(s.last_received_at.strftime("%Y-%m-%d %H:%M:%S")),
        ]
        for s in studies
    ]
    return [
        "<h2>Last studies</h2>",
        *_table(
            ["study (hash)", "state", "verdict", "tier", "latency to SR", "last instance (UTC)"],
            rows,
            "No study received yet.",
        ),
    ]


def _deliveries(deliveries: Sequence[DeliveryLine], retry_enabled: bool) -> list[str]:
    rows = []
    for d in deliveries:
        state = f"<span class=bad>{_e(d.state)}</span>" if d.state == "dead" else _e(d.state)
        action = ""
        if retry_enabled and d.state == "dead":
            action = (
                f'<form method=post action="/deliveries/{d.id}/retry">'
                '<input type=password name=token placeholder="retry token" size=12 required> '
                "<button type=submit>retry</button></form>"
            )
        rows.append(
            [
                str(d.id),
                _e(d.destination),
                _e(d.kind),
                state,
                str(d.attempts),
                _e(d.last_error) or "<span class=muted>-</span>",
                action,
            ]
        )
    note = (
        []
        if retry_enabled
        else [
            "<p class=muted>Retry from this page is off (http.retry_token_env unset): "
            "<code>scxnn-node deliveries retry ID</code>.</p>"
        ]
    )
    return [
        "<h2>Deliveries not sent</h2>",
        *_table(
            ["id", "destination", "output", "state", "attempts", "last error", ""],
            rows,
            "All deliveries sent.",
        ),
        *note,
    ]


def _errors(errors: list[dict[str, Any]]) -> list[str]:
    rows = [[_e(e["at"][:19]), _e(e["what"]), _e(e["error"])] for e in errors]
    return ["<h2>Last errors</h2>", *_table(["at (UTC)", "what", "error"], rows, "None.")]


def _drift(drift: dict[str, Any] | None) -> list[str]:
    if drift is None:
        return ["<h2>Drift</h2>", "<p class=muted>Drift watch unavailable.</p>"]
    head = (
        f"<p>{drift['studies']} studies and {drift['images']} images in the window of "
        f"{drift['window_studies']} (bundle {_e(drift['bundle_version'])})"
        + ("" if drift["has_reference"] else ": <b>the bundle has no drift reference</b>")
        + "</p>"
    )
    rows = [
        [
            _e(s["name"]),
            "<span class=bad>DRIFTED</span>"
            if s["drifted"]
            else (
                f"<span class=ok>{_e(s['state'])}</span>" if s["state"] == "ok" else _e(s["state"])
            ),
            _e(describe_statistic(s).removeprefix(f"{s['name']}: ")),
        ]
        for s in drift["statistics"]
    ]
    return ["<h2>Drift</h2>", head, *_table(["statistic", "state", "detail"], rows, "")]


def _disk(free_bytes: int, min_free_bytes: int) -> list[str]:
    low = free_bytes < min_free_bytes
    text = f"{free_bytes / 2**30:.1f} GiB free on the spool (C-STORE refused below " + (
        f"{min_free_bytes / 2**30:.1f} GiB)"
    )
    return ["<h2>Disk</h2>", f"<p class={'bad' if low else 'ok'}>{_e(text)}</p>"]
