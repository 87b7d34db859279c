"""The simulator's address space judged against the official OPEN-SCS model, and the openscs config model.

The address-space check is what a SCADA engineer would do with a generic OPC UA browser: a plain asyncua client
(nothing of linectl.sources) browses the running simulator, and every expectation comes from the OPC
Foundation's files (Opc.Ua.OPENSCS.NodeSet2.xml, OPENSCS.NodeIds.csv), parsed here on their own.
"""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, ua
from pydantic import ValidationError

from linectl.config import OpenScsSourceConfig
from linectl.sources.openscs import OpenScsSource
from tests.test_openscs import GTIN, Sim

OPCUA = Path(__file__).resolve().parent.parent / "linectl" / "standards" / "opcua"
OPENSCS_URI = "http://opcfoundation.org/UA/OPENSCS-SER/"
NS = {"u": "http://opcfoundation.org/UA/2011/03/UANodeSet.xsd", "x": "http://opcfoundation.org/UA/2008/02/Types.xsd"}


def node_ids() -> dict[str, int]:
    with (OPCUA / "OPENSCS.NodeIds.csv").open() as f:
        return {row[0]: int(row[1]) for row in csv.reader(f) if row}


def official_arguments(method: str, which: str) -> list[tuple[str, str]]:
    """(name, DataType NodeId as in the XML, "i=12" or "ns=1;i=15010") of the type's method arguments."""
    root = ET.parse(OPCUA / "Opc.Ua.OPENSCS.NodeSet2.xml").getroot()
    ids = node_ids()
    target = f"ns=1;i={ids[f'OPENSCSPoolManagerObjectType_{method}_{which}']}"
    for n in root:
        if n.get("NodeId") == target:
            return [(a.findtext("x:Name", namespaces=NS) or "", a.findtext("x:DataType/x:Identifier", namespaces=NS) or "")
                    for a in n.iter(f"{{{NS['x']}}}Argument")]
    raise AssertionError(f"{target} not in the nodeset")


def official_fields(datatype_id: int) -> list[str]:
    root = ET.parse(OPCUA / "Opc.Ua.OPENSCS.NodeSet2.xml").getroot()
    for n in root:
        if n.get("NodeId") == f"ns=1;i={datatype_id}":
            d = n.find("u:Definition", NS)
            return [] if d is None else [f.get("Name") or "" for f in d.findall("u:Field", NS)]
    raise AssertionError(datatype_id)


def as_xml_id(nodeid: Any, ns: int) -> str:
    if nodeid.NamespaceIndex == 0:
        return f"i={nodeid.Identifier}"
    assert nodeid.NamespaceIndex == ns, nodeid
    return f"ns=1;i={nodeid.Identifier}"


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    s = Sim(tmp_path_factory.mktemp("openscs-model"), "--page-size", "3", "--gtin", GTIN).start()
    yield s
    s.stop()


async def test_pool_manager_sits_where_the_official_model_says(sim: Sim) -> None:
    ids = node_ids()
    async with Client(sim.endpoint, timeout=30) as client:
        ns = await client.get_namespace_index(OPENSCS_URI)
        pm_type = client.get_node(ua.NodeId(ids["OPENSCSPoolManagerObjectType"], ns))
        assert (await pm_type.read_browse_name()).Name == "OPENSCSPoolManagerObjectType"
        assert await pm_type.read_node_class() == ua.NodeClass.ObjectType
        type_methods = {c.nodeid.Identifier: (await c.read_browse_name()).Name
                        for c in await pm_type.get_children(refs=ua.ObjectIds.HasComponent, nodeclassmask=ua.NodeClass.Method)}
        for m in ("SNRequestAllocated", "SNReturnAllocated", "SNRequestUnallocated", "SNRequestUnassigned",
                  "SNReturnUnallocated", "SNtoAllocated", "SNtoEncoded", "SNtoUnallocated"):
            assert type_methods[ids[f"OPENSCSPoolManagerObjectType_{m}"]] == m

        # the instance: an object of that type below Objects, as a browser finds it
        instances = []
        for child in await client.nodes.objects.get_children(nodeclassmask=ua.NodeClass.Object):
            td = await child.read_type_definition()
            if td is not None and td.NamespaceIndex == ns and td.Identifier == ids["OPENSCSPoolManagerObjectType"]:
                instances.append(child)
        assert len(instances) == 1
        pm = instances[0]
        for m in ("SNRequestAllocated", "SNReturnAllocated"):
            method = await pm.get_child(ua.QualifiedName(m, ns))
            assert await method.read_node_class() == ua.NodeClass.Method
            for which in ("InputArguments", "OutputArguments"):
                args = await (await method.get_child(ua.QualifiedName(which, 0))).read_value()
                served = [(a.Name, as_xml_id(a.DataType, ns)) for a in args]
                assert served == official_arguments(m, which), (m, which)
        assert official_arguments("SNRequestAllocated", "InputArguments") == [
            ("SNCollectionID", "i=12"), ("Count", "i=7"), ("SNFormat", "i=12"),
            ("PoolSelectionCriteria", f"ns=1;i={ids['OPENSCSKeyValueDataType']}"), ("RequestToken", "i=12")]
        props = {p: await (await pm.get_child(ua.QualifiedName(p, ns))).read_value()
                 for p in ("MaxSNRequestable", "MaxSNReturnable", "MaxSNPushable", "SNFormat")}
        assert "SERIALONLY" in props["SNFormat"]  # OPC 30260 6.3.1.1: the one format every pool manager takes
        assert props["MaxSNRequestable"] > 0 and props["MaxSNReturnable"] > 0

        # the SN collection type carries the fields of its parent (the official file gives it none)
        assert official_fields(ids["OPENSCSSNCollectionDataType"]) == []
        sdef = await client.get_node(ua.NodeId(ids["OPENSCSSNCollectionDataType"], ns)).read_data_type_definition()
        assert [f.Name for f in sdef.Fields] == official_fields(ids["OPENSCSCollectionDataType"])
        assert sdef.DefaultEncodingId.Identifier == ids["OPENSCSSNCollectionDataType_Encoding_DefaultBinary"]

        # and a generic client can call it as the model describes
        await client.load_data_type_definitions()
        kv = ua.extension_objects_by_datatype[ua.NodeId(ids["OPENSCSKeyValueDataType"], ns)]
        status, coll, token = await pm.call_method(
            ua.QualifiedName("SNRequestAllocated", ns), "unit", ua.Variant(5, ua.VariantType.UInt32), "SERIALONLY",
            ua.Variant([kv(Key="GTIN", Value=GTIN)], ua.VariantType.ExtensionObject), "scada-1")
        assert status == 1 and len(coll.SerialNumbers) == 3 and token
        sim_ns = await client.get_namespace_index("urn:linectl:simulators:openscs-l3")
        truth = json.loads(await client.get_node(ua.NodeId("Simulator", sim_ns)).call_method(ua.QualifiedName("GroundTruth", sim_ns)))
        assert truth["allocations"]["scada-1"]["serials"][:3] == coll.SerialNumbers


# --------------------------------------------------------------------------- config


def full() -> dict[str, Any]:
    return {
        "type": "openscs",
        "endpoint": "opc.tcp://l3.plant.local:4840/openscs",
        "security": {"policy": "Basic256Sha256", "mode": "Sign", "certificate": "/etc/linectl/opcua.der",
                     "private_key": "/etc/linectl/opcua.pem", "server_certificate": "/etc/linectl/l3.der"},
        "username": "line7",
        "password_env": "L3_PASSWORD",
        "timeout_s": 7.5,
        "pool_manager": "Plant/PoolManager",
        "sn_format": "EPCURI",
        "collection_id": "{gtin}-{lot}",
        "selection_criteria": {"GTIN": "{gtin}", "PoolID": "EU"},
    }


def test_config_maps_every_key_into_the_source() -> None:
    cfg = OpenScsSourceConfig.model_validate(full())
    src = OpenScsSource.from_config(cfg)
    assert (src.endpoint, src.policy, src.mode, src.certificate, src.private_key, src.server_certificate) == (
        "opc.tcp://l3.plant.local:4840/openscs", "Basic256Sha256", "Sign", "/etc/linectl/opcua.der",
        "/etc/linectl/opcua.pem", "/etc/linectl/l3.der")
    assert (src.username, src.password_env, src.password_file, src.timeout_s) == ("line7", "L3_PASSWORD", None, 7.5)
    assert (src.pool_manager, src.sn_format, src.collection_id) == ("Plant/PoolManager", "EPCURI", "{gtin}-{lot}")
    assert src.selection_criteria == {"GTIN": "{gtin}", "PoolID": "EU"}
    plain = OpenScsSource.from_config(OpenScsSourceConfig.model_validate({"type": "openscs", "endpoint": "opc.tcp://h:4840"}))
    assert (plain.policy, plain.username, plain.sn_format, plain.selection_criteria) == ("None", None, "SERIALONLY", {"GTIN": "{gtin}"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"password": "x"}, "Extra inputs are not permitted"),
        ({"password_env": None}, "username needs password_env or password_file"),
        ({"password_file": "/run/secrets/l3"}, "not both"),
        ({"username": None}, "need username"),
        ({"security": {"policy": "Basic256Sha256"}}, "needs certificate and private_key"),
        ({"security": {"policy": "None", "certificate": "/c.der"}}, "need policy: Basic256Sha256"),
        ({"security": {"policy": "Basic128Rsa15"}}, "Basic256Sha256"),
        ({"collection_id": "{serial}"}, "unknown placeholder"),
        ({"selection_criteria": {"GTIN": "{gtin"}}, "template"),
        ({"selection_criteria": {}}, "at least one pool selection criterion"),
        ({"endpoint": "http://l3:4840"}, "opc"),
        ({"sn_format": "LITERAL"}, "SERIALONLY"),
        ({"timeout_s": 0}, "greater than 0"),
        ({"password_env": "L3-PW"}, "pattern"),
    ],
)
def test_config_refuses(change: dict[str, Any], message: str) -> None:
    data = {**full(), **change}
    with pytest.raises(ValidationError, match=message):
        OpenScsSourceConfig.model_validate(data)
