"""Camera driver end to end: CameraSim writes real frames, the driver decodes them with real zxing-cpp.

No mocks: every assertion about a code is about what was decoded from pixels.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from linectl import gs1
from linectl.drivers.base import DRIVERS, DeviceError, HealthState, Read
from linectl.drivers.camera import Camera, CameraConfig
from linectl.drivers.decoders import DmtxDecoder, dmtx_available
from linectl.simulators.camera import CameraSim
from linectl.simulators.model import SimUnit

GTIN = "09501101530003"
needs_dmtx = pytest.mark.skipif(not dmtx_available(), reason="pylibdmtx / libdmtx0b not installed")


def unit(seq: int, *, damage: str | None = None, quality: float = 3.6, symbology: str = "]d2") -> SimUnit:
    code = gs1.compose_unit(GTIN, f"S{seq:011d}", lot=f"L{seq % 97}", expiry="301231")
    u = SimUnit(seq=seq, content=code.element_string, quality=quality, symbology=symbology)
    if damage:
        u.extras["damage"] = damage
    return u


def camera(folder: Path, **kw: object) -> Camera:
    cfg = CameraConfig.model_validate({"driver": "camera", "source": str(folder), "watch": True, "poll_interval_s": 0.002, **kw})
    return Camera("cam1", cfg)


async def collect(cam: Camera, n: int, timeout: float = 10.0) -> list[Read]:
    out: list[Read] = []

    async def take() -> None:
        async for r in cam.reads():
            out.append(r)
            if len(out) == n:
                return

    await asyncio.wait_for(take(), timeout)
    return out


async def run(folder: Path, units: list[SimUnit], seed: int = 7, **kw: object) -> list[Read]:
    folder.mkdir(parents=True, exist_ok=True)
    sim = CameraSim(folder=folder, seed=seed)
    cam = camera(folder, **kw)
    await cam.start()
    try:
        assert await cam.wait_connected(5)
        for u in units:
            sim.present(u)
        return await collect(cam, len(units))
    finally:
        sim.close()
        await cam.stop()


def test_registered_and_config_checked(tmp_path: Path) -> None:
    assert DRIVERS["camera"] is Camera
    with pytest.raises(ValidationError):
        CameraConfig.model_validate({"driver": "camera", "source": 0, "watch": True})
    with pytest.raises(ValidationError):
        CameraConfig.model_validate({"driver": "camera", "source": str(tmp_path), "roi": [0, 0, 0, 10]})
    with pytest.raises(ValidationError):
        CameraConfig.model_validate({"driver": "camera", "source": str(tmp_path), "exposure": 3})


async def test_good_units_read_as_gs1_with_grade(tmp_path: Path) -> None:
    units = [unit(s, quality=3.2 + 0.1 * (s % 9)) for s in range(1, 13)]
    reads = await run(tmp_path, units)
    assert [r.seq for r in reads] == [u.seq for u in units]
    for r, u in zip(reads, units):
        assert len(r.codes) == 1
        code = r.codes[0]
        assert code.data == u.content and "\x1d" in code.data
        assert code.symbology == "]d2"
        assert code.grade is not None and code.grade >= 3
        assert code.grade_detail["estimated"] is True
        assert code.grade_detail["version"] and code.grade_detail["uec"] == 1.0


async def test_plain_datamatrix_reported_as_d1(tmp_path: Path) -> None:
    u = unit(3, symbology="]d1")
    (r,) = await run(tmp_path, [u])
    assert r.codes[0].symbology == "]d1"
    assert r.codes[0].data == u.content


async def test_damage_fails_grade_or_read(tmp_path: Path) -> None:
    bad = [unit(s, damage="low_contrast") for s in range(1, 6)] + [unit(s, damage="smudge_heavy") for s in range(6, 16)]
    partial = [unit(s, damage="partial") for s in range(16, 22)]
    mild = [unit(s, damage="smudge_mild", quality=2.5) for s in range(22, 30)]
    blank = [SimUnit(seq=30, content=None, defect="no_print")]
    reads = await run(tmp_path, bad + partial + mild + blank)
    by_seq = {r.seq: r for r in reads}
    for u in bad:
        codes = by_seq[u.seq].codes
        # either nothing decoded, or the decoded content is right and graded below the FMD minimum
        assert not codes or (codes[0].data == u.content and codes[0].grade is not None and codes[0].grade < 1.5), (u.extras, codes)
    for u in partial:
        assert by_seq[u.seq].codes == ()
    for u in mild:
        (code,) = by_seq[u.seq].codes
        assert code.data == u.content and code.grade is not None and code.grade >= 2.5
    assert by_seq[30].codes == ()


async def test_roi_restricts_decoding(tmp_path: Path) -> None:
    # the simulator centres the label within ±30 px: a centred 400x400 ROI holds it, a corner ROI does not
    inside = await run(tmp_path / "a", [unit(1)], roi=[440, 312, 400, 400])
    (code,) = inside[0].codes
    xs = [c[0] for c in code.grade_detail["corners"]]
    assert 440 <= min(xs) and max(xs) <= 840  # reported in frame coordinates, not ROI coordinates
    outside = await run(tmp_path / "b", [unit(2)], roi=[0, 0, 300, 300])
    assert outside[0].codes == ()
    # an ROI beyond the frame is a configuration fault: health says so, no no-read is made up
    sim = CameraSim(folder=tmp_path / "c")
    cam = camera(tmp_path / "c", roi=[2000, 0, 100, 100])
    await sim.start()
    await cam.start()
    try:
        sim.present(unit(3))
        for _ in range(300):
            if cam.health.state == HealthState.DEGRADED:
                break
            await asyncio.sleep(0.01)
        assert "outside the 1280x1024 frame" in cam.health.reason
        assert cam._out.empty()
    finally:
        sim.close()
        await cam.stop()


async def test_case_frame_reads_120_codes(tmp_path: Path) -> None:
    units = [unit(s) for s in range(1000, 1120)]
    sim = CameraSim(folder=tmp_path)
    cam = camera(tmp_path, max_codes=120)
    await cam.start()
    try:
        seq = sim.present_many(units, seq=42)
        (r,) = await collect(cam, 1)
    finally:
        sim.close()
        await cam.stop()
    assert r.seq == seq == 42
    assert len(r.codes) == 120
    assert sorted(c.data for c in r.codes) == sorted(u.content for u in units)
    assert all(c.symbology == "]d2" for c in r.codes)


async def test_garbage_file_degrades_health_and_yields_nothing(tmp_path: Path) -> None:
    sim = CameraSim(folder=tmp_path)
    cam = camera(tmp_path)
    states: list[tuple[HealthState, str]] = []
    cam.on_health(lambda d, h: states.append((h.state, h.reason)))
    await cam.start()
    try:
        assert await cam.wait_connected(5)
        sim.inject("garbage")
        units = [unit(s) for s in (1, 2, 3)]
        for u in units:
            sim.present(u)
        reads = await collect(cam, 2)
    finally:
        sim.close()
        await cam.stop()
    assert [r.seq for r in reads] == [2, 3]
    assert [r.codes[0].data for r in reads] == [units[1].content, units[2].content]
    degraded = [reason for st, reason in states if st == HealthState.DEGRADED]
    assert degraded and "frame_0000000001" in degraded[0] and "not a readable image" in degraded[0]
    assert (HealthState.CONNECTED, "") in states[states.index((HealthState.DEGRADED, degraded[0])) :]


async def test_replay_in_name_order_counts_frames_and_deletes(tmp_path: Path) -> None:
    sim = CameraSim(folder=tmp_path)
    units = [unit(s) for s in (5, 6)]
    for name, u in zip(("b_first.bmp", "c_second.bmp"), units):
        cv2.imwrite(str(tmp_path / name), sim.render(u))
    (tmp_path / "a_notes.txt").write_text("ignored: not an image extension")
    cam = camera(tmp_path, watch=False, delete_after=True)
    await cam.start()
    try:
        reads = await collect(cam, 2)
        for _ in range(200):
            if cam.health.state == HealthState.DISCONNECTED:
                break
            await asyncio.sleep(0.01)
    finally:
        await cam.stop()
    assert [r.seq for r in reads] == [1, 2]  # no frame_<seq> in the names: frame counter
    assert [r.codes[0].data for r in reads] == [u.content for u in units]
    assert sorted(os.listdir(tmp_path)) == ["a_notes.txt"]


async def test_skip_existing_ignores_frames_from_before_start(tmp_path: Path) -> None:
    sim = CameraSim(folder=tmp_path)
    old, new = unit(1), unit(2)
    sim.write(sim.render(old), 1)
    cam = camera(tmp_path, skip_existing=True)
    await cam.start()
    try:
        assert await cam.wait_connected(5)
        sim.present(new)
        (r,) = await collect(cam, 1)
        await asyncio.sleep(0.05)
        assert cam._out.empty()
    finally:
        sim.close()
        await cam.stop()
    assert r.seq == 2 and r.codes[0].data == new.content


async def test_software_trigger_takes_one_frame_per_trigger(tmp_path: Path) -> None:
    sim = CameraSim(folder=tmp_path)
    u = unit(9)
    sim.write(sim.render(u), 9)
    cam = camera(tmp_path, trigger="software")
    await cam.start()
    try:
        assert await cam.wait_connected(5)
        await asyncio.sleep(0.1)
        assert cam._out.empty()  # nothing read before the trigger
        await cam.trigger(seq=77)
        (r,) = await collect(cam, 1)
    finally:
        await cam.stop()
    assert r.seq == 77 and r.codes[0].data == u.content
    hw = camera(tmp_path)
    with pytest.raises(DeviceError):
        await hw.trigger()


async def test_video_file_through_opencv_capture(tmp_path: Path) -> None:
    sim = CameraSim(folder=tmp_path / "frames")
    units = [unit(s) for s in (1, 2, 3)]
    path = tmp_path / "line.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (1280, 1024), False)
    assert w.isOpened()
    for u in units:
        w.write(sim.render(u))
    w.release()
    cam = Camera("cam1", CameraConfig(driver="camera", source=str(path)))
    await cam.start()
    try:
        reads = await collect(cam, 3)
    finally:
        await cam.stop()
    assert [r.seq for r in reads] == [1, 2, 3]
    assert [r.codes[0].data for r in reads] == [u.content for u in units]


async def test_missing_folder_is_disconnected_not_a_crash(tmp_path: Path) -> None:
    cam = camera(tmp_path / "nope")
    await cam.start()
    try:
        await asyncio.sleep(0.1)
        assert cam.health.state == HealthState.DISCONNECTED
        assert "does not exist" in cam.health.reason
        (tmp_path / "nope").mkdir()
        assert await cam.wait_connected(5)
    finally:
        await cam.stop()


@pytest.mark.skipif(dmtx_available(), reason="libdmtx is installed here; this covers machines without it")
async def test_dmtx_confirm_without_libdmtx_runs_zxing_only(tmp_path: Path) -> None:
    (r,) = await run(tmp_path, [unit(1)], dmtx="confirm")
    assert r.codes[0].grade_detail.get("dmtx") is None and r.codes[0].grade >= 3


@needs_dmtx
async def test_dmtx_confirms_zxing(tmp_path: Path) -> None:
    units = [unit(1), unit(2, symbology="]d1")]
    reads = await run(tmp_path, units, dmtx="confirm", dmtx_timeout_s=2.0)
    for r, u in zip(reads, units):
        assert r.codes[0].grade_detail["dmtx"] == "agree"
        assert r.codes[0].data == u.content


@needs_dmtx
def test_dmtx_child_crash_costs_one_answer() -> None:
    sim = CameraSim(folder="/nonexistent-not-written")
    u = unit(4)
    crop = sim.render(u)[350:700, 450:850]
    noise = np.random.default_rng(1).integers(0, 256, (1024, 1280), dtype=np.uint8)
    dec = DmtxDecoder(timeout_s=3.0)
    try:
        assert dec.decode(crop) == ("ok", [(u.content, "]d2")])
        # libdmtx searches noise for its whole budget; kill the child mid-search, as a C assertion would
        killer = threading.Timer(0.3, dec._proc.kill)
        killer.start()
        t0 = time.monotonic()
        assert dec.decode(noise) == ("crashed", [])
        assert time.monotonic() - t0 < 2.0
        assert dec.decode(crop) == ("ok", [(u.content, "]d2")])  # a fresh child serves the next call
        assert dec.restarts == 1
    finally:
        dec.close()
