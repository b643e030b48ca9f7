"""spotguard.ec2model: the shipped lean EC2 model is current, complete, and what clients use."""

from __future__ import annotations

import ast
import datetime as dt
from pathlib import Path

import pytest
from aiobotocore.session import get_session
from botocore import xform_name
from botocore.exceptions import ClientError

import spotguard
from spotguard import ec2model
from spotguard.aws import _lean_models, client, error_code

PACKAGE = Path(spotguard.__file__).parent
# Client attributes that are not EC2 operations.
CLIENT_PLUMBING = {"close", "meta", "exceptions", "can_paginate", "get_paginator", "get_waiter"}


def test_shipped_file_is_what_the_installed_botocore_gives():
    version, full = ec2model.botocore_model()
    shipped = ec2model.path(version)
    assert shipped.is_file(), f"no lean model for ec2 {version}: run `.venv/bin/python -m spotguard.ec2model`"
    assert shipped.read_text() == ec2model.render(ec2model.lean(full)), (
        "botocore's EC2 model changed: regenerate with `.venv/bin/python -m spotguard.ec2model` and review the diff")


def test_lean_is_pure_and_drops_documentation():
    _, full = ec2model.botocore_model()
    before = ec2model.render(full)
    model = ec2model.lean(full)
    assert ec2model.render(full) == before
    assert "documentation" not in ec2model.render(model)
    assert set(model["shapes"]["Instance"]["members"]) == ec2model.INSTANCE_MEMBERS
    assert set(model["shapes"]["SpotInstanceRequest"]["members"]) == ec2model.SPOT_REQUEST_MEMBERS
    # Inputs are whole: every parameter botocore knows is still accepted.
    assert model["shapes"]["DescribeInstancesRequest"]["members"].keys() == (
        full["shapes"]["DescribeInstancesRequest"]["members"].keys())


def _ec2_methods() -> dict[str, list[str]]:
    """Every `<ec2>.method` spotguard touches (`ec2.x`, `self.ec2.x`), called or passed on; method → places."""
    found: dict[str, list[str]] = {}
    for source in sorted(PACKAGE.rglob("*.py")):
        if "lab" in source.relative_to(PACKAGE).parts:  # the lab's moto world uses its own boto3 clients
            continue
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value
            named_ec2 = (isinstance(owner, ast.Name) and owner.id == "ec2") or (
                isinstance(owner, ast.Attribute) and owner.attr == "ec2")
            if named_ec2 and node.attr not in CLIENT_PLUMBING:
                found.setdefault(node.attr, []).append(f"{source.relative_to(PACKAGE)}:{node.lineno}")
    return found


def test_every_ec2_call_of_spotguard_is_in_the_lean_model_and_nothing_else():
    called = _ec2_methods()
    assert {"describe_instances", "start_instances"} <= called.keys()  # the finder finds
    operations = {xform_name(name) for name in ec2model.OPERATIONS}
    missing = {m: places for m, places in called.items() if m not in operations}
    assert not missing, f"EC2 calls missing from spotguard.ec2model.OPERATIONS: {missing}"
    assert operations == called.keys(), f"operations nobody calls: {operations - called.keys()}"


def test_the_lean_path_goes_first_once():
    session = get_session()
    _lean_models(_lean_models(session))
    paths = session.get_component("data_loader").search_paths
    assert paths[0] == str(ec2model.DATA) and paths.count(str(ec2model.DATA)) == 1


async def test_clients_use_the_lean_model_and_read_what_botocore_reads(moto_world):
    deployment = moto_world.provision(standbys=1, spot_tags={"Service": "lean"})
    full = moto_world.boto("ec2")  # boto3: botocore's whole model
    ids = [deployment.spot_instance_id, *deployment.standby_ids]
    async with client("ec2", moto_world.region, moto_world.endpoint_url, session=get_session()) as ec2:
        assert sorted(ec2.meta.service_model.operation_names) == sorted(ec2model.OPERATIONS)
        lean_reply = await ec2.describe_instances(InstanceIds=ids)
        tagged = await ec2.describe_instances(Filters=[{"Name": "tag:Service", "Values": ["lean"]}])
        requests = await ec2.describe_spot_instance_requests(SpotInstanceRequestIds=[deployment.spot_request_id])
        with pytest.raises(ClientError) as dry:
            await ec2.start_instances(InstanceIds=list(deployment.standby_ids), DryRun=True)
    assert error_code(dry.value) == "DryRunOperation"

    instances = {i["InstanceId"]: i for r in lean_reply["Reservations"] for i in r["Instances"]}
    full_reply = full.describe_instances(InstanceIds=ids)
    whole = {i["InstanceId"]: i for r in full_reply["Reservations"] for i in r["Instances"]}
    assert instances.keys() == set(ids)
    for iid, described in instances.items():
        assert described == {k: v for k, v in whole[iid].items() if k in ec2model.INSTANCE_MEMBERS}
    spot = instances[deployment.spot_instance_id]
    assert spot["State"]["Name"] == "running" and spot["InstanceLifecycle"] == "spot"
    assert spot["VpcId"] == deployment.vpc_id and isinstance(spot["LaunchTime"], dt.datetime)
    assert {"Key": "Service", "Value": "lean"} in spot["Tags"]
    assert instances[deployment.standby_ids[0]]["State"]["Name"] == "stopped"
    assert [i["InstanceId"] for r in tagged["Reservations"] for i in r["Instances"]] == [deployment.spot_instance_id]

    (request,) = requests["SpotInstanceRequests"]
    (whole_request,) = full.describe_spot_instance_requests(
        SpotInstanceRequestIds=[deployment.spot_request_id])["SpotInstanceRequests"]
    assert request == {k: v for k, v in whole_request.items() if k in ec2model.SPOT_REQUEST_MEMBERS}
    assert request["InstanceId"] == deployment.spot_instance_id and request["Status"]["Code"]
