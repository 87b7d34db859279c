"""`linectl export epcis --db PATH [-c CONFIG] [--batch LOT] [--since TIME] [--out FILE] [--format jsonld|xml|xml-1.2]`.

Writes one EPCISDocument (EPCIS 2.0 JSON-LD by default; EPCIS 2.0 XML with --format xml, EPCIS 1.2 XML
with --format xml-1.2, translated from the same stored events by linectl.epcis_xml) with the EPCIS events of the store's
outbox (forwarded or not), in store order: for a partner, an auditor, or an
upstream that lost data. Streams the document, so a year of events does not
have to fit in memory. Exit 0 done, 2 bad input, 3 the store refused the file
(missing, not a linectl store, another line's store).

Each event is written exactly as it was rendered when it was stored (the
outbox.epcis column), which is byte for byte what the forwarder published:
no config is needed, and a later config change (time zone, station GLN) does
not change the record. Rows of an older store carry no rendering; their
context was never recorded, so they are refused unless -c CONFIG is given,
and then reconstructed from that config and counted as reconstructed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from linectl.epcis_xml import XmlVersion
    from linectl.store import Store

PAGE = 5000
#: --format -> None (JSON-LD) or the EPCIS XML version written
FORMATS: dict[str, XmlVersion | None] = {"jsonld": None, "xml": "2.0", "xml-1.2": "1.2"}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export", help="export stored events (EPCIS 2.0 JSON-LD, EPCIS 2.0 XML or EPCIS 1.2 XML)")
    kinds = p.add_subparsers(dest="export_kind", metavar="FORMAT")
    e = kinds.add_parser("epcis", help="one EPCIS 2.0 EPCISDocument with the EPCIS events of the store")
    e.add_argument("--db", required=True, help="the line's SQLite store")
    e.add_argument("-c", "--config", help="only for events stored without their EPCIS rendering (a store from before schema 4): "
                   "reconstruct them with this line YAML's identity, time zone and company prefix lengths")
    e.add_argument("--batch", metavar="LOT", help="only events of this lot")
    e.add_argument("--since", metavar="TIME", help="only events with eventTime at or after TIME (ISO 8601 date or date-time; no offset = UTC)")
    e.add_argument("--out", metavar="FILE", help="output file (default stdout); written atomically")
    e.add_argument("--format", choices=list(FORMATS), default="jsonld", dest="format",
                   help="jsonld: EPCIS 2.0 JSON-LD (default); xml: EPCIS 2.0 XML; xml-1.2: EPCIS 1.2 XML (most L3/L4 systems)")
    e.add_argument("--validate", choices=["sample", "all", "none"], default="sample",
                   help="check events against the official schema of the format (JSON schema, or the XSD for XML): "
                   "one of each shape (default), every event (slow), or none")
    e.set_defaults(func=run)


def parse_since(text: str) -> datetime:
    t = text.strip()
    try:
        d = datetime.fromisoformat(t.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since {text!r} is not an ISO 8601 date or date-time (e.g. 2026-03-01 or 2026-03-01T08:00:00+01:00)") from None
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def run(args: argparse.Namespace) -> int:
    from linectl.config import load_config
    from linectl.yamlsource import ConfigFileError

    cfg = None
    if args.config:
        try:
            cfg = load_config(args.config)
        except ConfigFileError as exc:
            for prob in exc.problems:
                print(prob.format(args.config), file=sys.stderr)
            return 2
    since = None
    if args.since:
        try:
            since = parse_since(args.since)
        except ValueError as exc:
            print(f"linectl export epcis: {exc}", file=sys.stderr)
            return 2
    from linectl.store.cliutil import run_async

    args.since_dt = since
    return run_async(lambda: _export(args, cfg, since))


async def _export(args: argparse.Namespace, cfg: Any, since: datetime | None) -> int:
    from linectl import epcis
    from linectl.store.cliutil import open_store

    # read-only (never creates, migrates or locks); refuses another line's store: its events would carry our GLN
    store = await open_store(args.db, cfg, readonly=True, command="linectl export epcis")
    try:
        mapper = epcis.EpcisMapper.from_config(cfg) if cfg is not None else None
        unrendered = await asyncio.to_thread(_unrendered, store, args)
        if unrendered and mapper is None:
            first, last, count = unrendered
            print(
                f"linectl export epcis: {args.db}: {count} EPCIS event(s) (outbox seq {first}..{last}) were stored by an older "
                "linectl without their EPCIS rendering, so their readPoint, time zone offset and EPC form were never recorded. "
                "Refusing to invent them: pass -c CONFIG to reconstruct those events from that line config "
                "(a reconstruction, reported as such), or --batch/--since to leave them out.",
                file=sys.stderr,
            )
            return 2
        xml_version = FORMATS[getattr(args, "format", "jsonld")]
        validator: Any = None
        if args.validate != "none":
            if xml_version is None:
                validator = epcis.default_validator()
            else:
                from linectl import epcis_xml

                validator = epcis_xml.default_validator(xml_version)
        if args.out:
            out_path = Path(args.out)
            fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=str(out_path.parent or "."))
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    n, failed = await asyncio.to_thread(_write, fh, store, mapper, validator, args, since)
                    fh.flush()
                    os.fsync(fh.fileno())
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an export is an ordinary file
                os.replace(tmp, out_path)
            except BaseException:
                _unlink_quietly(tmp)
                raise
        else:
            n, failed = await asyncio.to_thread(_write, sys.stdout, store, mapper, validator, args, since)
            sys.stdout.flush()
    except epcis.EpcisValidationError as exc:
        print(f"linectl export epcis: produced an event that fails the EPCIS schema (a bug): {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # epcis_xml.XmlMappingError: a stored event with no rendering in the asked XML version
        print(f"linectl export epcis: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    print(f"exported {n} EPCIS event(s)" + (f" to {args.out}" if args.out else ""), file=sys.stderr)
    if unrendered:
        print(f"linectl export epcis: {unrendered[2]} stored event(s) had no stored EPCIS rendering and were RECONSTRUCTED "
              f"from {args.config} (readPoint, time zone offset, EPC form as that config says now, not as recorded)", file=sys.stderr)
    if failed:
        print(f"linectl export epcis: {len(failed)} event(s) could not be mapped and are missing (seq {failed[:10]})", file=sys.stderr)
        return 1
    return 0


def _unrendered(store: Store, args: argparse.Namespace) -> tuple[int, int, int] | None:
    """(first seq, last seq, count) of the EPCIS rows this export would need to reconstruct, or None."""
    if not store.unrendered_epcis_rows():  # the usual case: one indexed-free count, no second pass
        return None
    first = last = None
    count = 0
    for row in _epcis_rows(store, args):
        if row.epcis is None:
            first = row.seq if first is None else first
            last = row.seq
            count += 1
    return (first, last, count) if first is not None and last is not None else None


def _epcis_rows(store: Store, args: argparse.Namespace) -> Iterator[Any]:
    """The outbox rows this export covers (EPCIS-relevant kinds, --batch/--since), page by page in store order."""
    after = 0
    while True:
        rows = store.outbox(after, PAGE, only_unforwarded=False)
        if not rows:
            return
        after = rows[-1].seq
        for row in rows:
            if row.event.epcis and _selected(row, args):
                yield row


def _selected(row: Any, args: argparse.Namespace) -> bool:
    e = row.event
    if args.batch is not None and (row.lot if row.lot is not None else e.lot) != args.batch:
        return False
    since = args.since_dt
    if since is not None:
        t = e.event_time if e.event_time.tzinfo else e.event_time.replace(tzinfo=UTC)
        if t < since:
            return False
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _write(fh: TextIO, store: Store, mapper: Any, validator: Any, args: argparse.Namespace, since: datetime | None) -> tuple[int, list[int]]:
    """(worker thread) stream the document: head, events page by page, tail."""
    from linectl import epcis
    from linectl.events import UnitDecommissioned

    seen_shapes: set[tuple[Any, ...]] = set()
    failed: list[int] = []
    xml_version = FORMATS[getattr(args, "format", "jsonld")]
    if xml_version is not None:
        from linectl import epcis_xml
    fh.write(epcis.document_head() if xml_version is None else epcis_xml.document_head(xml_version))
    n = 0
    for row in _epcis_rows(store, args):
        e = row.event
        stored = row.epcis
        if stored is None:  # an older store's row: reconstructed (run() refused without a config)
            commissioned = not isinstance(e, UnitDecommissioned) or store.was_commissioned(e.gtin, e.serial, row.seq)
            stored = mapper.render(e, commissioned=commissioned)
        if stored.startswith(epcis.RENDER_FAILED):
            print(f"linectl export epcis: seq {row.seq} ({row.kind}, {row.event_id}) left out: {stored[1:]}", file=sys.stderr)
            failed.append(row.seq)
            continue
        for enc in epcis.stored_events(stored):
            ev: dict[str, Any] = json.loads(enc) if validator is not None or xml_version is not None else {}
            text = enc if xml_version is None else epcis_xml.event_xml(ev, xml_version)
            if validator is not None:
                shape = (ev["type"], ev["action"], ev.get("bizStep"), ev.get("disposition"), tuple(sorted(ev)))
                if args.validate == "all" or shape not in seen_shapes:
                    seen_shapes.add(shape)
                    if xml_version is None:
                        validator.validate(epcis.build_document([ev]))
                    else:  # the event in a document of its own: the XSD judges the same bytes that are written
                        validator.validate((epcis_xml.document_head(xml_version) + text + epcis_xml.DOCUMENT_TAIL).encode())
            if xml_version is None:
                fh.write(("," if n else "") + text)
            else:
                fh.write(text)
            n += 1
    fh.write(epcis.DOCUMENT_TAIL if xml_version is None else epcis_xml.DOCUMENT_TAIL)
    fh.write("\n")
    return n, failed
