"""The QU4RTET harness (tests/l4) proven with plain HTTP: a real L4 answers serial requests and keeps EPCIS.

Everything here goes over the wire with urllib and the stdlib XML parser; nothing of QU4RTET is imported.
"""

from __future__ import annotations

import ast
import json
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.l4.harness import TIMINGS, Qu4rtet, fresh_qu4rtet, qu4rtet  # noqa: F401

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SAP_NS = "http://sap.com/xi/AIN"
TRACELINK_NS = "urn:tracelink:soap"


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def sap_request(gtin: str, size: int, *, namespaced: bool = True, randomized: bool = True) -> bytes:
    """An SAP AII number range request as a line system sends it (Guardian's shape; UniTrace without namespace)."""
    root = "ain:NumberRangeRequestMessage" if namespaced else "NumberRangeRequestMessage"
    ns = f' xmlns:ain="{SAP_NS}"' if namespaced else ""
    random_flag = "<RequestRandomizedNumbers>X</RequestRandomizedNumbers>" if randomized else ""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="{SOAP_ENV}"{ns}>
  <soapenv:Header/>
  <soapenv:Body>
    <{root}>
      <SendingSystem>LINE-01</SendingSystem>
      <IDType>GS1_SER</IDType>
      <EncodingType>SGTIN</EncodingType>
      <Size>{size}</Size>
      <ObjectKey>
        <Name>GTIN</Name>
        <Value>{gtin}</Value>
      </ObjectKey>
      {random_flag}
    </{root}>
  </soapenv:Body>
</soapenv:Envelope>""".encode()


def tracelink_request(gtin: str, size: int) -> bytes:
    """A TraceLink SNX serialNumbersRequest (element names and order of TraceLink's published schema)."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="{SOAP_ENV}" xmlns:urn="{TRACELINK_NS}">
  <soapenv:Header/>
  <soapenv:Body>
    <urn:serialNumbersRequest>
      <SendingSystem>LINE-01</SendingSystem>
      <ReceivingSystem>0950600000005</ReceivingSystem>
      <IdType>GS1_SER</IdType>
      <EncodingType>SGTIN</EncodingType>
      <Size>{size}</Size>
      <ObjectKey>
        <Name>GTIN</Name>
        <Value>{gtin}</Value>
      </ObjectKey>
      <RequestRandomizedNumber>X</RequestRandomizedNumber>
      <SyncRequest>true</SyncRequest>
    </urn:serialNumbersRequest>
  </soapenv:Body>
</soapenv:Envelope>""".encode()


def soap_body(reply: bytes) -> ET.Element:
    root = ET.fromstring(reply)
    assert root.tag == f"{{{SOAP_ENV}}}Envelope", reply
    body = root.find(f"{{{SOAP_ENV}}}Body")
    assert body is not None and len(body) == 1, reply
    return body[0]


def text(el: ET.Element, path: str) -> str:
    found = el.find(path)
    assert found is not None and found.text is not None, f"{path} missing in {ET.tostring(el)!r}"
    return found.text


EPCIS_DOC = b"""<?xml version="1.0" encoding="UTF-8"?>
<epcis:EPCISDocument xmlns:epcis="urn:epcglobal:epcis:xsd:1" schemaVersion="1.2" creationDate="2026-12-02T06:00:00.000Z">
  <EPCISBody>
    <EventList>
      <ObjectEvent>
        <eventTime>2026-12-02T06:00:00.000Z</eventTime>
        <eventTimeZoneOffset>+00:00</eventTimeZoneOffset>
        <epcList>
          <epc>urn:epc:id:sgtin:9506000.013435.%(s1)s</epc>
          <epc>urn:epc:id:sgtin:9506000.013435.%(s2)s</epc>
        </epcList>
        <action>ADD</action>
        <bizStep>urn:epcglobal:cbv:bizstep:commissioning</bizStep>
        <disposition>urn:epcglobal:cbv:disp:active</disposition>
        <readPoint><id>urn:epc:id:sgln:9506000.00000.1</id></readPoint>
        <bizLocation><id>urn:epc:id:sgln:9506000.00000.0</id></bizLocation>
      </ObjectEvent>
    </EventList>
  </EPCISBody>
</epcis:EPCISDocument>
"""


def test_timings_of_venv_migrate_and_start(qu4rtet: Qu4rtet, record_property: pytest.RecordProperty) -> None:
    """The server of the session answers; the build figures of this run are reported (0 = cached)."""
    assert qu4rtet.running
    for key in ("venv_build", "migrate", "seed", "start"):
        record_property(f"qu4rtet_{key}_s", round(TIMINGS.get(key, 0.0), 1))
    print("qu4rtet timings (s):", {k: round(v, 1) for k, v in TIMINGS.items()})
    assert TIMINGS["start"] > 0


def test_rest_allocate_random_and_sequential(qu4rtet: Qu4rtet) -> None:
    rnd, seq = qu4rtet.new_gtin(), qu4rtet.new_gtin()
    qu4rtet.create_pools(
        [
            dict(machine_name=rnd, kind="random", minimum=100_000, maximum=999_999_999, request_threshold=500),
            dict(machine_name=seq, kind="sequential", minimum=1000, maximum=1_000_000, request_threshold=500),
        ]
    )
    status, body = http("GET", qu4rtet.allocate_url(rnd, 20), headers=qu4rtet.auth_header)
    assert status == 200, body
    reply = json.loads(body)
    assert isinstance(reply["numbers"], str)  # a list literal inside a string
    numbers = ast.literal_eval(reply["numbers"])
    assert len(numbers) == 20 == len(set(numbers)) and reply["type"] == "random" and reply["fulfilled"] is True
    assert all(100_000 <= n <= 999_999_999 for n in numbers)
    again = ast.literal_eval(json.loads(http("GET", qu4rtet.allocate_url(rnd, 20), headers=qu4rtet.basic_auth_header)[1])["numbers"])
    assert not set(again) & set(numbers)

    first = json.loads(http("GET", qu4rtet.allocate_url(seq, 10), headers=qu4rtet.auth_header)[1])
    second = json.loads(http("GET", qu4rtet.allocate_url(seq, 5), headers=qu4rtet.auth_header)[1])
    assert (first["type"], ast.literal_eval(first["numbers"])) == ("sequential", [1000, 1009])
    assert ast.literal_eval(second["numbers"]) == [1010, 1014]

    # over the request threshold: a 500 whose detail says why
    status, body = http("GET", qu4rtet.allocate_url(rnd, 501), headers=qu4rtet.auth_header)
    assert status == 500 and b"threshold" in body.lower(), body
    status, body = http("GET", qu4rtet.allocate_url(qu4rtet.new_gtin(), 5), headers=qu4rtet.auth_header)
    assert status == 404, body


def test_unauthenticated_requests_are_refused(qu4rtet: Qu4rtet) -> None:
    gtin = qu4rtet.new_gtin()
    qu4rtet.create_pool(gtin, kind="random", request_threshold=100, response="sap")
    assert http("GET", qu4rtet.allocate_url(gtin, 5))[0] == 401
    assert http("POST", qu4rtet.soap_url("sap"), sap_request(gtin, 5), {"Content-Type": "text/xml"})[0] == 401
    assert http("POST", qu4rtet.capture_url, EPCIS_DOC % {b"s1": b"1", b"s2": b"2"}, {"Content-Type": "application/xml"})[0] == 401
    bad = {"Authorization": "Token " + "0" * 40}
    assert http("GET", qu4rtet.allocate_url(gtin, 5), headers=bad)[0] == 401


def test_soap_sap_guardian_random_and_sequential(qu4rtet: Qu4rtet) -> None:
    rnd, seq = qu4rtet.new_gtin(), qu4rtet.new_gtin()
    qu4rtet.create_pool(rnd, kind="random", minimum=1, maximum=10**12, request_threshold=1000, response="sap")
    qu4rtet.create_pool(seq, kind="sequential", minimum=5000, maximum=10**9, request_threshold=1000, response="sap")
    headers = {"Content-Type": "text/xml", **qu4rtet.auth_header}

    status, reply = http("POST", qu4rtet.soap_url("sap"), sap_request(rnd, 7), headers)
    assert status == 200, reply
    msg = soap_body(reply)
    assert msg.tag == f"{{{SAP_NS}}}NumberRangeConfirmationMessage"
    assert (text(msg, "ReceivingSystem"), text(msg, "ActionCode"), text(msg, "IDType"), text(msg, "EncodingType")) == ("LINE-01", "C", "GS1_SER", "SGTIN")
    assert (text(msg, "ObjectKey/Name"), text(msg, "ObjectKey/Value")) == ("GTIN", rnd)
    serials = [el.text for el in msg.findall("RandomizedNumberList/SerialNo")]
    assert len(serials) == 7 == len(set(serials)) and all(s and s.isdigit() for s in serials)
    assert msg.find("Interval") is None

    status, reply = http("POST", qu4rtet.soap_url("sap"), sap_request(seq, 100, randomized=False), headers)
    assert status == 200, reply
    msg = soap_body(reply)
    assert (text(msg, "Interval/NumberFrom"), text(msg, "Interval/NumberTo")) == ("5000", "5099")
    assert msg.find("RandomizedNumberList") is None
    status, reply = http("POST", qu4rtet.soap_url("sap"), sap_request(seq, 1, randomized=False), headers)
    assert (text(soap_body(reply), "Interval/NumberFrom"), text(soap_body(reply), "Interval/NumberTo")) == ("5100", "5100")


def test_soap_unitrace_unqualified(qu4rtet: Qu4rtet) -> None:
    gtin = qu4rtet.new_gtin()
    qu4rtet.create_pool(gtin, kind="random", minimum=1, maximum=10**9, request_threshold=1000, response="unitrace")
    status, reply = http("POST", qu4rtet.soap_url("unitrace"), sap_request(gtin, 4, namespaced=False), {"Content-Type": "text/xml", **qu4rtet.basic_auth_header})
    assert status == 200, reply
    msg = soap_body(reply)
    assert msg.tag == "NumberRangeConfirmationMessage"
    assert text(msg, "ObjectKey/Value") == gtin
    assert len({el.text for el in msg.findall("RandomizedNumberList/SerialNo")}) == 4


def test_soap_tracelink_serials_and_element_strings(qu4rtet: Qu4rtet) -> None:
    plain, gs1, seq = qu4rtet.new_gtin(), qu4rtet.new_gtin(), qu4rtet.new_gtin()
    qu4rtet.create_pool(plain, kind="random", minimum=1, maximum=10**9, request_threshold=1000, response="tracelink")
    qu4rtet.create_pool(gs1, kind="random", minimum=1, maximum=10**9, request_threshold=1000, response="tracelink", element_strings=True)
    qu4rtet.create_pool(seq, kind="sequential", minimum=1, maximum=10**9, request_threshold=1000, response="tracelink", element_strings=True)
    headers = {"Content-Type": "text/xml", **qu4rtet.auth_header}

    status, reply = http("POST", qu4rtet.soap_url("tracelink"), tracelink_request(plain, 5), headers)
    assert status == 200, reply
    msg = soap_body(reply)
    assert msg.tag == f"{{{TRACELINK_NS}}}serialNumbersRequestResponse"
    sn = msg.find("SNResponse")
    assert sn is not None
    assert [child.tag for child in sn] == ["ReceivingSystem", "SendingSystem", "ActionCode", "EncodingType", "IDType", "ObjectKey", "RandomizedNumberList"]
    assert (text(sn, "ReceivingSystem"), text(sn, "SendingSystem"), text(sn, "IDType")) == ("LINE-01", "0950600000005", "GS1_SER")
    serials = [el.text or "" for el in sn.findall("RandomizedNumberList/SerialNo")]
    assert len(set(serials)) == 5 and all(s.isdigit() and not s.startswith("01" + plain) for s in serials)

    status, reply = http("POST", qu4rtet.soap_url("tracelink"), tracelink_request(gs1, 3), headers)
    assert status == 200, reply
    strings = [el.text or "" for el in soap_body(reply).findall("SNResponse/RandomizedNumberList/SerialNo")]
    assert len(strings) == 3 and all(s.startswith(f"01{gs1}21") and s[18:].isdigit() for s in strings)

    status, reply = http("POST", qu4rtet.soap_url("tracelink"), tracelink_request(seq, 10), headers)
    assert status == 200, reply
    sn = soap_body(reply).find("SNResponse")
    assert sn is not None
    assert (text(sn, "Interval/NumberFrom"), text(sn, "Interval/NumberTo")) == (f"01{seq}211", f"01{seq}2110")

    status, wsdl = http("GET", qu4rtet.soap_url("tracelink") + "?wsdl", headers=qu4rtet.auth_header)
    assert status == 200 and b"serialNumbersRequest" in wsdl


def test_capture_epcis_12_and_read_back(qu4rtet: Qu4rtet) -> None:
    s1, s2 = f"{time.time_ns()}", f"{time.time_ns() + 1}"
    doc = EPCIS_DOC % {b"s1": s1.encode(), b"s2": s2.encode()}
    status, body = http("POST", qu4rtet.capture_url, doc, {"Content-Type": "application/xml", **qu4rtet.auth_header})
    assert status == 201, body
    task = json.loads(body)
    assert qu4rtet.task(task)["status"] == "FINISHED"

    urn1 = f"urn:epc:id:sgtin:9506000.013435.{s1}"
    events = qu4rtet.events_by_epc(urn1)
    assert len(events) == 1
    event = events[0]["objectEvent"]
    assert event["action"] == "ADD" and event["bizStep"] == "urn:epcglobal:cbv:bizstep:commissioning"
    assert sorted(event["epcList"]) == sorted([urn1, f"urn:epc:id:sgtin:9506000.013435.{s2}"])
    assert event["eventTime"].startswith("2026-12-02T06:00:00")
    assert any(e["id"] == event["id"] for e in qu4rtet.events())
    assert {urn1} <= {e["identifier"] for e in qu4rtet.entries()}
    assert qu4rtet.events_by_epc("urn:epc:id:sgtin:9506000.013435.404404") == []

    # malformed XML: QU4RTET answers 500 with the parser's message, and the task is FAILED
    status, body = http("POST", qu4rtet.capture_url, b"<epcis:EPCISDocument", {"Content-Type": "application/xml", **qu4rtet.auth_header})
    assert status == 500 and b"detail" in body, body


def test_restart_on_same_db_keeps_pools_and_events(fresh_qu4rtet: Qu4rtet, tmp_path: Path) -> None:
    q = fresh_qu4rtet
    gtin = q.new_gtin()
    q.create_pool(gtin, kind="sequential", minimum=1, maximum=10**6, request_threshold=100)
    assert q.allocate(gtin, 10) == [1, 10]
    q.capture(EPCIS_DOC % {b"s1": b"71", b"s2": b"72"})
    port, pid = q.port, q.pid

    q.stop()
    assert not q.running
    with pytest.raises(OSError):
        urllib.request.urlopen(q.allocate_url(gtin, 1), timeout=5)
    q.start()
    assert (q.port, q.running) == (port, True) and q.pid != pid
    assert q.allocate(gtin, 10) == [11, 20]
    assert len(q.events_by_epc("urn:epc:id:sgtin:9506000.013435.71")) == 1
