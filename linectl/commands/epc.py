"""`linectl epc encode|decode`: EPC binary encodings (SGTIN-96, SGTIN-198, SSCC-96) for commissioning RFID.

Commissioning an RFID printer or reader starts with "what hex should this tag
carry, and what does the hex this reader reports mean?". Both answers come from
linectl.epc, the code the line itself runs, printed as one JSON object:
scheme, filter_value, company_prefix_length, gtin, sscc, serial, pure_uri,
tag_uri, epc_hex and pc_word (the PC word to write with the EPC).

Exit codes: 0 done, 2 bad input (the reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("epc", help="encode a GTIN + serial or an SSCC as an RFID EPC, or decode a tag's EPC")
    verbs = p.add_subparsers(dest="epc_command", metavar="encode|decode", required=True)
    enc = verbs.add_parser("encode", help="GTIN + serial (sgtin-96, sgtin-198, auto) or SSCC (sscc-96) to EPC hex")
    enc.add_argument("--scheme", default="auto", choices=["auto", "sgtin-96", "sgtin-198", "sscc-96"],
                     help="auto: sgtin-96 when the serial fits it, else sgtin-198 (default)")
    enc.add_argument("--gtin", help="GTIN-8/12/13/14 with its check digit")
    enc.add_argument("--serial", help="the AI (21) serial, unescaped")
    enc.add_argument("--sscc", help="18-digit SSCC with its check digit (scheme sscc-96)")
    enc.add_argument("--filter", type=int, required=True, dest="filter_value", metavar="0-7",
                     help="TDS filter value: SGTIN 1 POS item, 2 full case, 4 inner pack, 6 unit load; SSCC 2 full case, 6 unit load")
    enc.add_argument("--cp-length", type=int, required=True, dest="cp_length", metavar="6-12",
                     help="GS1 company prefix length in digits")
    enc.set_defaults(func=run_encode)
    dec = verbs.add_parser("decode", help="EPC hex as a reader reports it (or an urn:epc:tag: URI) to its value")
    dec.add_argument("epc", metavar="HEX|TAG-URI")
    dec.set_defaults(func=run_decode)


def _print(value: object) -> None:
    from dataclasses import asdict

    from linectl.epc import EpcValue

    assert isinstance(value, EpcValue)
    print(json.dumps({**asdict(value), "pc_word": value.pc_word}, ensure_ascii=False))


def run_encode(args: argparse.Namespace) -> int:
    from linectl.epc import EpcError, choose_scheme, make_epc

    try:
        if args.scheme == "sscc-96" or args.sscc is not None:
            if args.scheme not in ("auto", "sscc-96"):
                raise EpcError(f"--sscc goes with --scheme sscc-96 (or auto), not {args.scheme}")
            value = make_epc("sscc-96", sscc=args.sscc, gtin=args.gtin, serial=args.serial,
                             company_prefix_length=args.cp_length, filter_value=args.filter_value)
        else:
            if args.gtin is None or args.serial is None:
                raise EpcError("an SGTIN needs --gtin and --serial (or give --sscc for an SSCC-96)")
            scheme = choose_scheme(args.serial) if args.scheme == "auto" else args.scheme
            value = make_epc(scheme, gtin=args.gtin, serial=args.serial,
                             company_prefix_length=args.cp_length, filter_value=args.filter_value)
    except EpcError as exc:
        print(f"linectl epc encode: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _print(value)
    return EXIT_OK


def run_decode(args: argparse.Namespace) -> int:
    from linectl.epc import EpcError, decode_epc, parse_tag_uri

    text = args.epc.strip()
    try:
        value = parse_tag_uri(text) if text.lower().startswith("urn:") else decode_epc(text)
    except EpcError as exc:
        print(f"linectl epc decode: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _print(value)
    return EXIT_OK
