"""The `simulation:` section of a line YAML: how the simulated line behaves. `linectl run` ignores it.

Distances are in product pitches (one pitch = 60 / rate_upm seconds at the
current speed). They are the physics of the simulated line; linectl must not
rely on them, it tracks units by seq.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from linectl.simulators.model import UNIT_DEFECTS


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FaultRate(_Model):
    """A fault that strikes a device at random (Poisson), seeded with the line seed."""

    per_hour: float = Field(ge=0, description="mean occurrences per hour of simulated running")
    duration_s: float | None = Field(5.0, gt=0, description="how long each occurrence lasts")
    params: dict[str, Any] = Field(default_factory=dict, description="extra fault parameters, e.g. {delay_s: 1.5}")


class RfidTunnelSim(_Model):
    """The case packer's RFID tunnel (a case station whose reader is `driver: llrp`): how cases pass it, and its faults.

    Each rate is the chance per case, drawn with the line seed; the packer's ground truth (`tunnel` in its
    status) names what was done to which case.
    """

    dwell_s: float = Field(
        1.0, gt=0, le=60,
        description="seconds a case's tags stay in the reader's field after the PLC counted it (the next case entering ends it sooner)",
    )
    stray_rate: float = Field(0.0, ge=0, le=1, description="a unit of the neighbouring case at the edge of the field (weak tag)")
    stray_rssi: int = Field(-72, ge=-128, le=0, description="dBm of such a stray tag")
    dead_tag_rate: float = Field(0.0, ge=0, le=1, description="one unit of the case has a tag that does not answer")
    missing_unit_rate: float = Field(0.0, ge=0, le=1, description="one unit falls off before the tunnel: the case holds one less")
    linger_rate: float = Field(0.0, ge=0, le=1, description="one tag of the case stays in the field into the next case's window")


class SimulationConfig(_Model):
    rate_upm: float = Field(600.0, gt=0, le=12_000, description="line speed, units per minute")
    defect_rate: float = Field(0.0, ge=0, le=1, description="fraction of printed units given a defect that must be rejected")
    defect_mix: dict[str, float] = Field(
        default_factory=dict, description="relative weights of the defects in simulators.model.UNIT_DEFECTS; empty = equal"
    )
    variation_rate: float = Field(0.0, ge=0, le=1, description="fraction of good units with a harmless variation (must pass)")
    seed: int = Field(1, description="same seed, same defects on the same unit seqs")
    camera_distance: float = Field(2.0, gt=0, description="pitches from the printer trigger to the read point")
    gate_distance: float = Field(8.0, gt=0, description="pitches from the printer trigger to the reject gate")
    control_host: str = "127.0.0.1"
    control_port: int = Field(7700, ge=0, le=65535, description="JSON-lines control/truth server; 0 = any free port")
    units: int = Field(0, ge=0, description="stop feeding after this many units; 0 = endless")
    downstream_defect_rate: float = Field(
        0.0, ge=0, le=1,
        description="fraction of the units a print_verify gate passed that get damaged on the way to a verify station "
        "downstream (smudged, copied code, foreign label): ground truth says the verify gate must reject them",
    )
    free_run: bool = Field(
        False, description="feed product without a controller (ignore the PLC interlock); the gate stays fail-safe"
    )
    pack_delay_s: float = Field(0.5, ge=0, le=60, description="case packer: seconds from the reject gate into the open case")
    case_travel_s: float = Field(1.5, ge=0, le=600, description="seconds from the case labeller to the palletizer's scanner")
    rfid_tunnel: RfidTunnelSim = Field(default_factory=RfidTunnelSim, description="the case packer's RFID tunnel, when the case reader is RFID")
    rfid_void_rate: float = Field(
        0.0, ge=0, le=1, description="RFID ZPL printers: fraction of labels whose tag fails (printed VOID)"
    )
    rfid_wrong_epc_rate: float = Field(
        0.0, ge=0, le=1, description="RFID ZPL printers: fraction of labels whose tag keeps another EPC (the write hit the neighbouring inlay)"
    )
    rfid_no_answer_rate: float = Field(
        0.0, ge=0, le=1, description="RFID ZPL printers: fraction of labels whose verification never reaches the host (the tag is right)"
    )
    units_log: str | None = Field(
        None, description="append-only JSON-lines ground truth: one line per unit fed and per unit at the gate (see UnitJournal)"
    )
    faults: dict[str, dict[str, FaultRate]] = Field(
        default_factory=dict, description="device name -> fault kind -> rate; kinds are the device simulator's inject() faults"
    )

    @field_validator("defect_mix")
    @classmethod
    def _mix(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k in v if k not in UNIT_DEFECTS]
        if bad:
            raise ValueError(f"unknown defect(s) {bad}; known: {', '.join(UNIT_DEFECTS)}")
        if any(w < 0 for w in v.values()):
            raise ValueError("defect_mix weights must be >= 0")
        if v and sum(v.values()) <= 0:
            raise ValueError("defect_mix weights sum to 0")
        return v

    @model_validator(mode="after")
    def _distances(self) -> SimulationConfig:
        if self.gate_distance <= self.camera_distance:
            raise ValueError(
                f"gate_distance ({self.gate_distance}) must be greater than camera_distance ({self.camera_distance}): "
                "the gate is downstream of the read point"
            )
        return self

    @classmethod
    def from_line(cls, line_cfg: Any) -> SimulationConfig:
        """From a LineConfig whose `simulation` is still a plain dict (or already typed, or absent)."""
        sim = getattr(line_cfg, "simulation", None)
        if sim is None:
            return cls()
        if isinstance(sim, cls):
            return sim
        if isinstance(sim, BaseModel):
            return cls.model_validate(sim.model_dump())
        return cls.model_validate(sim)
