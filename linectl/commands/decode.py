"""`linectl decode IMAGE... [--json] [--roi x,y,w,h]`: decode and grade saved frames as the camera driver does.

Commissioning a camera starts from saved frames: does every code read, with
which content, at which estimated grade, and would the line reject it? This
command answers through the driver's own FrameDecoder (same loader, same
zxing-cpp options, same grading), so what it prints is what the line would
decide. `-c CONFIG --camera NAME` takes that camera's settings (ROI,
try_rotate/try_invert, grading.calibrated) from the line's YAML.

Exit codes: 0 every image had at least one code, 1 an image had none,
2 bad input (a file that is missing, not an image or truncated; a bad
--roi or one outside the image; a bad config). Every image is processed
even when an earlier one failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_NO_CODE, EXIT_BAD_INPUT = 0, 1, 2
MAX_CODES = 1000  # commissioning wants to see every code in the frame, not the station's max_codes
NOTE = "grades are ISO/IEC 15415-style estimates from a camera image: process-control indicators, not an ISO verification"
CONTENT_TYPES = {"GS1": "gs1", "Text": "text", "Binary": "binary", "Mixed": "mixed", "ISO15434": "iso15434", "UnknownECI": "unknown_eci"}


class BadInput(Exception):
    pass


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("decode", help="decode and grade image files through the camera driver's path")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (png, jpg, bmp, pgm, tif, webp)")
    p.add_argument("--json", action="store_true", help="one JSON object per code (JSON Lines) on stdout")
    p.add_argument("--roi", metavar="x,y,w,h", help="decode only this rectangle (corners still in image pixels)")
    p.add_argument("-c", "--config", metavar="PATH", help="line YAML holding the camera to imitate (with --camera)")
    p.add_argument("--camera", metavar="NAME", help="a `driver: camera` device of --config: its ROI, decoder options and grading")
    p.add_argument("--calibrated", action="store_true", help="grade as a calibrated camera: AN and GN gate the grade too")
    p.set_defaults(func=run)


def parse_roi(text: str) -> tuple[int, int, int, int]:
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise BadInput(f"--roi {text!r}: expected x,y,w,h (four integers)") from None
    if x < 0 or y < 0 or w <= 0 or h <= 0:
        raise BadInput(f"--roi {text!r}: x and y must be >= 0, w and h > 0")
    return x, y, w, h


def camera_config(args: argparse.Namespace) -> Any:
    """The CameraConfig to decode with: the named camera's, or the driver defaults; then the command-line overrides."""
    from linectl.drivers.camera import CameraConfig

    base: dict[str, Any] = {"driver": "camera", "source": "."}
    if args.camera or args.config:
        if not (args.camera and args.config):
            raise BadInput("--camera and --config go together")
        from linectl.config import load_config
        from linectl.yamlsource import ConfigFileError

        try:
            cfg = load_config(args.config)
        except ConfigFileError as exc:
            raise BadInput("\n".join(p.format(args.config) for p in exc.problems)) from None
        dev = cfg.devices.get(args.camera)
        if not isinstance(dev, CameraConfig):
            cams = sorted(n for n, d in cfg.devices.items() if isinstance(d, CameraConfig))
            raise BadInput(f"{args.config}: no camera named {args.camera!r} (cameras: {', '.join(cams) or 'none'})")
        base = dev.model_dump()
    base["max_codes"] = MAX_CODES
    if args.roi is not None:
        base["roi"] = parse_roi(args.roi)
    if args.calibrated:
        base["grading"] = {"enabled": True, "calibrated": True}
    return CameraConfig.model_validate(base)


def code_record(image: str, index: int, code: Any) -> dict[str, Any]:
    """One code as the JSON output gives it (field names documented in README, `linectl decode`)."""
    d = code.grade_detail
    graded = code.grade is not None
    return {
        "image": image,
        "index": index,
        "content": code.data,
        "symbology_identifier": code.symbology,
        "content_type": CONTENT_TYPES.get(d.get("content_type", ""), str(d.get("content_type", "")).lower() or None),
        "grade": d.get("letter") if graded else None,
        "grade_value": code.grade,
        "grade_all": d.get("letter_all"),
        "grade_all_value": d.get("overall_all_grade"),
        "gating": d.get("gating", []),
        "report_only": d.get("report_only", []),
        "parameters": d.get("parameters", []),
        "position": d.get("corners"),
        "version": d.get("version"),
        "module_px": d.get("module_px"),
        "calibrated": d.get("calibrated", False),
        "estimated": True,
        "reason": d.get("reason"),
        "decoder": d.get("decoder"),
        "note": NOTE,
    }


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else ("<GS>" if c == "\x1d" else f"<0x{ord(c):02X}>") for c in text)


def print_human(image: str, records: list[dict[str, Any]]) -> None:
    print(f"{image}: {len(records)} code{'s' if len(records) != 1 else ''}")
    for r in records:
        grade = f"{r['grade']} ({r['grade_value']:.1f})" if r["grade"] else f"none ({r['reason'] or 'not graded'})"
        print(f"  [{r['index']}] {r['symbology_identifier']} {r['content_type']}  {_printable(r['content'])}")
        print(f"      grade {grade}, estimated; with geometry {r['grade_all'] or '-'}; {r['version'] or '?'} at {r['module_px'] or '?'} px/module")
        for p in r["parameters"]:
            value = "" if p["value"] is None else f" {p['value']}"
            role = "gates" if p["gating"] else "report only"
            print(f"      {p['name']:7s}{value:>9s}  {p['letter']}  ({role})")
        print(f"      position {r['position']}")


def run(args: argparse.Namespace) -> int:
    import structlog

    from linectl.drivers.camera import FrameDecoder, load_image, roi_outside

    log = structlog.get_logger("linectl.decode")
    try:
        config = camera_config(args)
    except BadInput as exc:
        print(f"linectl decode: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as exc:  # pydantic: a setting the camera would refuse too
        print(f"linectl decode: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    decoder = FrameDecoder(config, log)
    worst = EXIT_OK
    for image in args.images:
        try:
            data = Path(image).read_bytes()
        except OSError as exc:
            worst = _fail(args, image, f"cannot read: {exc.strerror or exc}", EXIT_BAD_INPUT, worst)
            continue
        gray, error = load_image(data, image)
        if gray is None:
            worst = _fail(args, image, str(error).removeprefix(f"{image}: "), EXIT_BAD_INPUT, worst)
            continue
        if roi_outside(config.roi, gray):
            worst = _fail(args, image, f"roi {list(config.roi or ())} lies outside the {gray.shape[1]}x{gray.shape[0]} image", EXIT_BAD_INPUT, worst)
            continue
        records = [code_record(image, i, c) for i, c in enumerate(decoder.decode(gray), 1)]
        if args.json:
            for r in records:
                print(json.dumps(r, ensure_ascii=False))
        else:
            print_human(image, records)
        if not records:
            worst = _fail(args, image, "no code found", EXIT_NO_CODE, worst, printed=not args.json)
    if not args.json:
        print(f"note: {NOTE}")
    return worst


def _fail(args: argparse.Namespace, image: str, reason: str, code: int, worst: int, printed: bool = False) -> int:
    """Report one image that yielded nothing; the exit code is the worst seen (2 over 1 over 0)."""
    if args.json:
        print(json.dumps({"image": image, "error": reason, "exit": code}, ensure_ascii=False))
    elif not printed:
        print(f"{image}: {reason}")
    if code == EXIT_BAD_INPUT:
        print(f"linectl decode: {image}: {reason}", file=sys.stderr)
    return max(worst, code)
