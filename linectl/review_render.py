"""The batch review (linectl.review) as HTML and PDF: the same content as its JSON, for a person to read and sign.

One HTML body in a small tag set (h1-h3, p, b, font, br, table) serves both:
the browser document wraps it with a print stylesheet (self-contained: no
script, no external asset), and the PDF is that same body laid out by fpdf2
(pure Python: nothing to install on a line PC besides the wheel). Every value
from the store is escaped (html.escape): a lot, a reason or an actor is
user input and never becomes markup.

The PDF embeds a Unicode TrueType font when the machine has one
(DejaVu Sans, Liberation Sans, Noto Sans, or what `fc-match` names); without
one it falls back to the PDF core font Helvetica, which has only Latin-1, and
writes any other character as <U+XXXX> so that nothing is lost silently.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
from typing import Any

#: Unicode fonts tried for the PDF, in order (regular, bold)
FONT_CANDIDATES = (
    ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"),
    ("/usr/share/fonts/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans-Bold.ttf"),
    ("/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf", "/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf"),
    ("/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf", "/usr/share/fonts/truetype/noto/NotoSans-Bold.ttf"),
    ("C:\\Windows\\Fonts\\arial.ttf", "C:\\Windows\\Fonts\\arialbd.ttf"),
)

RED = "#b00020"
GREEN = "#1b5e20"


def e(v: Any) -> str:
    """Any value as escaped text: None as an em dash, structures as compact JSON."""
    if v is None:
        return "(none)"
    if isinstance(v, (dict, list)):
        v = json.dumps(v, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))
    return html.escape(str(v), quote=True)


def _table(headers: list[tuple[str, int]], rows: list[list[Any]]) -> str:
    """A table; `headers` are (title, width %). Cells are escaped here, so callers pass raw values."""
    head = "".join(f'<th width="{w}%">{html.escape(t)}</th>' for t, w in headers)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table border="1" width="100%"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _kv(pairs: list[tuple[str, Any]]) -> str:
    """Label / value rows (labels are ours, values escaped)."""
    body = "".join(f'<tr><td width="30%"><b>{html.escape(k)}</b></td><td width="70%">{e(v)}</td></tr>' for k, v in pairs)
    return f'<table border="1" width="100%"><tbody>{body}</tbody></table>'


def _loud(text: str, ok: bool) -> str:
    return f'<p><font color="{GREEN if ok else RED}"><b>{html.escape(text)}</b></font></p>'


def render_body(doc: dict[str, Any]) -> str:
    """The review as an HTML fragment in the tag set fpdf2's write_html lays out (also the browser page's body)."""
    b, chain, trail = doc["batch"], doc["chain"], doc["audit_trail"]
    out: list[str] = [f"<h1>Batch review: lot {e(b['lot'])}</h1>"]
    if chain["verified"]:
        out.append(_loud(f"Audit trail hash chain VERIFIED: {chain['records_verified']} records up to head "
                         f"#{chain['head_seq']} {chain['head_hash']}", True))
    else:
        out.append(_loud(f"AUDIT TRAIL HASH CHAIN BROKEN at record {chain['first_bad_seq']}: {chain['problem']}. "
                         f"Only records 1..{chain['records_verified']} are verified; this batch record cannot be relied on as it stands.", False))
    out.append(f"<p>Generated {e(doc['generated_at'])} by {e(doc['generated_by'])} from store {e(doc['store'])}; "
               f"local times in {e(doc['local_zone'])}. Review digest (sha256): {e(doc.get('review_digest'))}</p>")
    out.append("<h2>Batch</h2>")
    out.append(_kv([
        ("Lot", b["lot"]), ("GTIN", b["gtin"]), ("Product", b["product"]), ("Expiry (YYMMDD)", b["expiry"]),
        *[(k, v) for k, v in sorted((b.get("dates") or {}).items())],
        ("Planned quantity", b["planned_qty"]), ("Achieved (commissioned)", b["achieved_qty"]), ("State", b["state"]),
        ("Created", f"{b['created_at']} by {b['created_by']}"), ("Started", b["started_at"]), ("Stopped", b["stopped_at"]), ("Closed", b["closed_at"]),
    ]))
    cfg, clock = doc.get("config"), doc.get("clock")
    out.append("<h2>Configuration and clock</h2>")
    out.append(_kv([
        ("Config (resolved) sha256", cfg.get("config_sha256") if cfg else "not recorded (batch created before linectl recorded it)"),
        ("Config file", cfg.get("config_file") if cfg else None),
        ("Config file sha256", cfg.get("config_file_sha256") if cfg else None),
        ("Clock", f"{clock.get('clock')}; NTP synchronised: {clock.get('ntp_synchronized')} ({clock.get('how')}); "
                  f"zone {clock.get('timezone')} {clock.get('utc_offset')}" if clock else "unknown (no daemon start recorded before the batch)"),
    ]))
    out.append("<h2>Audit trail</h2>")
    out.append(f"<p>{e(trail['rule'])}: records {e(trail['first_seq'])} to {e(trail['last_seq'])}"
               f"{'' if trail['closed'] else ' (batch not closed: up to the head)'}; {len(trail['records'])} shown.</p>")
    out.append(_table(
        [("#", 4), ("UTC / local", 14), ("Who / origin", 11), ("Action", 10), ("Old", 18), ("New", 18), ("Reason", 14), ("Chain", 11)],
        [[r["seq"], f"{r['ts_utc']} / {r['ts_local']}", f"{r['actor']} ({r['origin']})", f"{r['action']} [{r['scope']}]",
          r["old"], r["new"], r["reason"], ("ok " if r["verified"] else "NOT VERIFIED ") + r["hash"][:16]] for r in trail["records"]],
    ))
    out.append("<h2>Hash chain</h2>")
    out.append(_kv([
        ("Verified", "yes" if chain["verified"] else "NO"), ("Records in chain", chain["records_in_chain"]),
        ("Records verified", chain["records_verified"]), ("Head", f"#{chain['head_seq']} {chain['head_hash']}"),
        ("First bad record", chain["first_bad_seq"]), ("Problem", chain["problem"]),
        ("Records shown not verified", chain["shown_records_not_verified"] or "none"),
    ]))
    sig = doc["signatures"]
    out.append("<h2>Electronic signatures</h2>")
    if not sig["table_present"]:
        out.append(f"<p>{e(sig['note'])}</p>")
    elif not sig["rows"]:
        out.append(f"<p>{e(sig['note'])}</p>")
    else:
        out.append(_table([("Record", 8), ("Action", 12), ("Signer", 16), ("Meaning", 8), ("Signed (UTC)", 18), ("Second signer", 16),
                           ("Meaning", 8), ("Record unchanged", 8)],
                          [[r.get("record_ref"), r.get("signed_action"), f"{r.get('signer_name')} ({r.get('signer')})", r.get("meaning"),
                            r.get("signed_at"), f"{r.get('second_signer_name')} ({r.get('second_signer')})" if r.get("second_signer") else "",
                            r.get("second_meaning") or "", "yes" if r.get("digest_matches") else "NO"] for r in sig["rows"]]))
    ch = doc["challenge"]
    out.append("<h2>Challenge test</h2>")
    st = ch.get("status") or {}
    out.append(_kv([("Required", st.get("required")), ("Passed", st.get("passed")), ("Failed", st.get("failed")), ("Never ran", st.get("never_ran"))]))
    if ch["results"]:
        out.append(_table([("Time", 25), ("Challenge", 20), ("Station", 20), ("Rejected", 15), ("Reason seen", 20)],
                          [[c["time"], c["challenge"], c["station"], "yes" if c["rejected"] else "NO", c["reason_seen"]] for c in ch["results"]]))
    rec = doc["reconciliation"]
    out.append("<h2>Reconciliation</h2>")
    out.append(_loud(f"Serials {'BALANCED' if rec['balanced'] else 'NOT BALANCED'}: {rec['provisioned']} provisioned = "
                     f"{rec['commissioned']} commissioned + {rec['decommissioned']} decommissioned + {rec['returned']} returned + "
                     f"{rec['voided']} voided", bool(rec["balanced"])))
    out.append(_kv([
        ("Still allocated / sent", f"{rec['still_allocated']} / {rec['still_sent']}"), ("Rejects by reason", rec["rejects_by_reason"] or "none"),
        ("Units of unknown fate", rec["fate_unknown"]), ("Reconciled units", rec["fates_reconciled"] or "none"),
        ("Packs (PLC counters)", "balanced" if rec["balanced_packs"] else ("no PLC counters" if rec["balanced_packs"] is None else "NOT balanced")),
        ("Problems", rec["problems"] + (rec["packs"] or {}).get("problems", []) or "none"),
    ]))
    out.append("<h2>Alarms during the batch</h2>")
    if doc["alarms"]:
        out.append(_table([("Raised", 18), ("Code", 14), ("Severity", 8), ("Message", 30), ("Acknowledged", 30)],
                          [[a["raised_at"], a["code"], a["severity"], a["message"],
                            "; ".join(f"{k['by']} at {k['at']}" for k in a["acknowledgements"]) or "NOT ACKNOWLEDGED"] for a in doc["alarms"]]))
    else:
        out.append("<p>No alarm was raised.</p>")
    rv = doc["review"]
    out.append("<h2>Review</h2>")
    for x in rv.get("earlier_signatures") or []:
        out.append(f"<p>Review signed by {e(x.get('signer_name'))} ({e(x.get('signer'))}), {e(x.get('meaning'))}, at {e(x.get('signed_at'))}"
                   + (f", with {e(x.get('second_signer_name'))} ({e(x.get('second_signer'))}), {e(x.get('second_meaning'))}" if x.get("second_signer") else "")
                   + f": review digest {e(x.get('review_digest'))} (record {e(x.get('seq'))})</p>")
    out.append(_kv([("Reviewed by", rv.get("reviewed_by") or ""), ("Meaning", rv.get("meaning") or ""), ("Date", rv.get("date") or ""),
                    ("Signs", f"review digest {doc.get('review_digest')}")]))
    return "".join(out)


_STYLE = """
body{font-family:"DejaVu Sans",Arial,sans-serif;font-size:9pt;margin:12mm;color:#000}
h1{font-size:15pt}h2{font-size:11pt;margin-top:14pt;border-bottom:1px solid #999}
table{border-collapse:collapse;width:100%;table-layout:fixed}
td,th{border:1px solid #888;padding:2px 4px;vertical-align:top;word-wrap:break-word;overflow-wrap:anywhere;text-align:left}
th{background:#eee}
@media print{h2{page-break-after:avoid}tr{page-break-inside:avoid}}
"""


def render_html(doc: dict[str, Any]) -> str:
    """A self-contained printable HTML page (inline CSS, no script, no external asset)."""
    title = e(f"Batch review {doc['batch']['lot']}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_STYLE}</style></head><body>{render_body(doc)}</body></html>\n")


def _unicode_font() -> tuple[str, str] | None:
    for regular, bold in FONT_CANDIDATES:
        if os.path.exists(regular) and os.path.exists(bold):
            return regular, bold
    exe = shutil.which("fc-match")
    if exe is None:
        return None
    try:
        paths = [subprocess.run([exe, "-f", "%{file}", f"sans:style={s}"], capture_output=True, text=True, timeout=5, check=False).stdout.strip()
                 for s in ("Regular", "Bold")]
    except (OSError, subprocess.SubprocessError):
        return None
    if all(p.lower().endswith(".ttf") and os.path.exists(p) for p in paths):
        return paths[0], paths[1]
    return None


def _latin1(text: str) -> str:
    return "".join(c if ord(c) < 256 else f"<U+{ord(c):04X}>" for c in text)


def render_pdf(doc: dict[str, Any]) -> bytes:
    """The review as PDF: the HTML body laid out by fpdf2 (A4 landscape, page numbers, the lot on every page)."""
    from fpdf import FPDF

    lot = str(doc["batch"]["lot"])

    class Review(FPDF):
        def footer(self) -> None:
            self.set_y(-10)
            self.set_font(self.font_family, size=7)
            self.cell(0, 5, text=f"Batch review {lot} - review digest {doc.get('review_digest')} - page {self.page_no()}/{{nb}}", align="C")

    pdf = Review(orientation="L", format="A4")
    pdf.set_title(f"Batch review {lot}")
    pdf.set_creator(str(doc["generated_by"]))
    font = _unicode_font()
    if font is not None:
        pdf.add_font("review", "", font[0])
        pdf.add_font("review", "B", font[1])
        pdf.set_font("review", size=8)
        body = render_body(doc)
    else:  # core font: Latin-1 only; other characters written as <U+XXXX>, never dropped
        body, lot = render_body(_latin1_doc(doc)), _latin1(lot)
        pdf.set_font("helvetica", size=8)
    pdf.set_auto_page_break(True, margin=14)
    pdf.add_page()
    pdf.write_html(body)
    return bytes(pdf.output())


def _latin1_doc(v: Any) -> Any:
    if isinstance(v, str):
        return _latin1(v)
    if isinstance(v, dict):
        return {k: _latin1_doc(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_latin1_doc(x) for x in v]
    return v
