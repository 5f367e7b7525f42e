"""Elastic instances on the loopback cluster: nodes started by hand join a running job, a node
removed mid-batch leaves it, and the output is exact. The nodes carry a resource only these
tests' workers ask for, so the session cluster's own nodes never host an instance."""

import json

import pytest
from conftest import make_spec, quiet, wait_for
from test_faults import expected_rows, output_lines, texts

import raypar
from raypar.engine import elastic
from raypar.errors import PlacementError
from raypar.jobdir.ledger import Ledger
from raypar.jobdir.state import JobState

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


def elastic_spec(tmp_path, files, step, **extra):
    return make_spec(tmp_path, files, **{
        "resources.instance_count": "1..2", "max_concurrency_per_instance": 1,
        "retry_settings.max_retries": 0,  # a batch lost with its node must not spend the only try
        "raypar.worker": {"num_cpus": 0.5, "resources": {"elastic": 1}},
        "task.program_arguments": f"--with-node --step {step}", **extra,
    })


def autoscaler_request() -> list:
    """What the cluster's autoscaler is asked to make room for (Ray's v1 request channel; the
    loopback cluster runs no autoscaler v2)."""
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    assert not is_autoscaler_v2()
    return json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"[]")


def end_job(ray_cluster, job, step, nodes):
    """Let every waiting batch go, wait for the job, remove the nodes the test added; the outcome."""
    (step / "free").touch()
    outcome = job.wait()
    for node in nodes:
        ray_cluster.remove_node(node)
    return outcome


def ran(step) -> dict[str, str]:
    """batch's first file and attempt -> the node it ran on, as run() wrote them."""
    return {p.name[4:]: p.read_text() for p in step.iterdir() if p.name.startswith("ran-") and p.read_text()}


def test_a_node_that_joins_takes_work_and_a_node_that_leaves_mid_batch_loses_nothing(ray_cluster, tmp_path):
    first = ray_cluster.add_node(num_cpus=1, resources={"elastic": 1})
    ray_cluster.wait_for_nodes()
    nodes = [first]
    step = tmp_path / "step"
    step.mkdir()
    files = texts(12)  # 6 mini-batches of 2 files
    spec = elastic_spec(tmp_path, files, step)

    job = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet, wait=False)  # the driver in a thread:
    try:  # nodes are added from this one (Ray's Node wants the main thread)
        wait_for(lambda: "f000.txt-1" in ran(step), "the first batch to run")
        assert ran(step)["f000.txt-1"] == first.node_id
        assert autoscaler_request() == [{"CPU": 0.5, "elastic": 1}] * 2  # room for max_instance_count
        nodes.append(ray_cluster.add_node(num_cpus=1, resources={"elastic": 1}))  # a node started by hand
        second = nodes[-1].node_id
        (step / "go-f000.txt").touch()
        wait_for(lambda: second in ran(step).values(), "a batch to run on the node that joined")
        wait_for(lambda: any(k != "f000.txt-1" and n == first.node_id for k, n in ran(step).items()),
                 "the first node to hold a second batch")
        ray_cluster.remove_node(first)  # mid-batch: that batch must run again on the other node
        nodes.remove(first)
    finally:
        outcome = end_job(ray_cluster, job, step, nodes)

    assert outcome.state is JobState.SUCCEEDED and outcome.failed == 0
    assert autoscaler_request() == []  # withdrawn at the end
    rows = [line.split(" ") for line in output_lines(tmp_path)]
    assert [" ".join(r[:3]) for r in rows] == expected_rows(files)  # every row once, in order
    by_node = {r[0]: r[4] for r in rows}
    second = {node for node in by_node.values() if node != first.node_id}
    assert len(second) == 1  # the rest ran on the node that joined
    runs = ran(step)
    lost = [k.rsplit("-", 1)[0] for k, node in runs.items() if node == first.node_id and k != "f000.txt-1"]
    assert len(lost) == 1 and f"{lost[0]}-2" in runs  # the batch caught by the removal ran again...
    assert by_node[lost[0]] in second  # ...and its rows are the second node's
    failed = Ledger(str(tmp_path / "job")).view().failed
    assert [(r.kind, r.final) for records in failed.values() for r in records] == [("system", False)]


def test_an_elastic_job_that_finds_too_few_nodes_says_what_it_lacks(ray_cluster, tmp_path):
    spec = make_spec(tmp_path, texts(2), **{
        "resources.instance_count": "2..4", "raypar.placement_timeout": 1,
        "raypar.worker": {"num_cpus": 0.5, "resources": {"elastic_none": 1}},
    })

    with pytest.raises(PlacementError, match=r"at least 2 node\(s\) with \{CPU 0.5, elastic_none 1\} free each "
                                               r"\(instance_count=2, max_instance_count=4\); 0 placed, the cluster "
                                               r"has 0 such node\(s\) of 3 alive; waited 1s"):
        raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()


def hold_the_room_of(node):
    """Another job's worker on ``node``, holding its "elastic" room; ray.kill() the handle returned."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    class Holder:  # defined here: Ray ships it by value (workers cannot import this module)
        def ready(self):
            return True

    holder = ray.remote(num_cpus=0, resources={"elastic": 1})(Holder).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote()
    ray.get(holder.ready.remote())
    return holder


def test_a_node_that_fits_but_is_busy_does_not_keep_a_joining_node_out(ray_cluster, tmp_path, monkeypatch):
    # Two instances at most. Node "busy" fits one but another job's actor holds its room: the
    # job starts on "free" and offers "busy" its second place; when "busy" cannot take it within
    # PLACE_SECONDS, the place goes to the node that joins next.
    import ray

    monkeypatch.setattr(elastic, "PLACE_SECONDS", 1.0)
    free, busy = (ray_cluster.add_node(num_cpus=1, resources={"elastic": 1}) for _ in range(2))
    ray_cluster.wait_for_nodes()
    nodes = [free, busy]
    other_job = hold_the_room_of(busy)
    step = tmp_path / "step"
    step.mkdir()
    files = texts(8)
    job = raypar.run(elastic_spec(tmp_path, files, step), job_dir=str(tmp_path / "job"), echo=quiet, wait=False)
    try:
        wait_for(lambda: "f000.txt-1" in ran(step), "the first batch to run")
        nodes.append(ray_cluster.add_node(num_cpus=1, resources={"elastic": 1}))
        joined = nodes[-1].node_id
        (step / "go-f000.txt").touch()
        wait_for(lambda: joined in ran(step).values(), "a batch to run on the node that joined")
    finally:
        (step / "free").touch()
        outcome = job.wait()
        ray.kill(other_job)
        for node in nodes:
            ray_cluster.remove_node(node)

    assert outcome.state is JobState.SUCCEEDED
    rows = [line.split(" ") for line in output_lines(tmp_path)]
    assert [" ".join(r[:3]) for r in rows] == expected_rows(files)
    assert {r[4] for r in rows} <= {free.node_id, joined} and busy.node_id not in set(ran(step).values())


def test_a_busy_node_does_not_keep_a_free_one_out_at_the_start(ray_cluster, tmp_path, monkeypatch):
    # Two instances needed to start, at most two: "busy" (the first in the order nodes are offered
    # places: by node ID) is offered one but another job holds its room; the place goes to the
    # third node within PLACE_SECONDS.
    import ray

    monkeypatch.setattr(elastic, "PLACE_SECONDS", 1.0)
    nodes = [ray_cluster.add_node(num_cpus=1, resources={"elastic": 1}) for _ in range(3)]
    ray_cluster.wait_for_nodes()
    try:
        busy = min(nodes, key=lambda node: node.node_id)
        other_job = hold_the_room_of(busy)
        files = texts(8)
        spec = make_spec(tmp_path, files, **{
            "resources.instance_count": "2..2", "max_concurrency_per_instance": 1,
            "raypar.worker": {"num_cpus": 0.5, "resources": {"elastic": 1}}, "raypar.placement_timeout": 30,
            "task.program_arguments": "--with-node",
        })

        outcome = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet).wait()
        ray.kill(other_job)
    finally:
        for node in nodes:
            ray_cluster.remove_node(node)

    assert outcome.state is JobState.SUCCEEDED
    rows = [line.split(" ") for line in output_lines(tmp_path)]
    assert [" ".join(r[:3]) for r in rows] == expected_rows(files)
    assert {r[4] for r in rows} <= {node.node_id for node in nodes if node is not busy}  # it started: 2 placed


def test_at_the_tail_an_instance_with_nothing_left_to_run_gives_its_node_back(ray_cluster, tmp_path):
    # Two instances; the first batch waits for the test, every other runs at once. Once nothing is
    # left to send, the instance that finished its batches stops its worker (shutdown() runs) and
    # gives its node back: its placement group is removed and the autoscaler is asked for one
    # instance, while the first batch still runs.
    import ray

    nodes = [ray_cluster.add_node(num_cpus=1, resources={"elastic": 1}) for _ in range(2)]
    ray_cluster.wait_for_nodes()
    step, stopped = tmp_path / "step", tmp_path / "stopped"
    step.mkdir()
    stopped.mkdir()
    files = texts(12)  # 6 mini-batches of 2 files
    for name in sorted(files)[2::2]:
        (step / f"go-{name}").touch()
    spec = elastic_spec(tmp_path, files, step, **{
        "resources.instance_count": "2..2",
        "task.program_arguments": f"--with-node --step {step} --shutdown-log {stopped}"})
    before = set(ray.util.placement_group_table())
    bundle = {"CPU": 0.5, "elastic": 1}

    job = raypar.run(spec, job_dir=str(tmp_path / "job"), echo=quiet, wait=False)
    try:
        wait_for(lambda: "f000.txt-1" in ran(step), "the first batch to run")
        holder = ran(step)["f000.txt-1"]
        wait_for(lambda: autoscaler_request() == [bundle], "the request to shrink to one instance")
        groups = {k: g for k, g in ray.util.placement_group_table().items() if k not in before}
        removed = [g for g in groups.values() if g["state"] == "REMOVED"]
        assert len(groups) == 2 and len(removed) == 1
        assert set(removed[0]["bundles_to_node_id"].values()) != {holder}  # the idle instance's
        assert len(list(stopped.iterdir())) == 1  # its worker ran shutdown() before it went
        assert "f000.txt-2" not in ran(step)  # the first batch still runs, once
    finally:
        outcome = end_job(ray_cluster, job, step, nodes)

    assert outcome.state is JobState.SUCCEEDED and outcome.failed == 0
    assert autoscaler_request() == []
    rows = [line.split(" ") for line in output_lines(tmp_path)]
    assert [" ".join(r[:3]) for r in rows] == expected_rows(files)  # every row once, in order
    assert len(list(stopped.iterdir())) == 2
