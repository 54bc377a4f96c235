"""infra/: the KubeRay, cluster-launcher and Docker files parse and say what matters."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from batchgen.spec import spec_from_dict

INFRA = Path(__file__).resolve().parents[1] / "infra"
ROOT = INFRA.parent


def _docs(name: str) -> list[dict]:
    docs = [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d is not None]
    assert docs, f"{name} is empty"
    return docs


def _kind(name: str, kind: str) -> dict:
    found = [d for d in _docs(name) if d.get("kind") == kind]
    assert len(found) == 1, f"{name}: expected one {kind}, found {len(found)}"
    return found[0]


def _gpus(container: dict) -> int:
    res = container.get("resources", {})
    return int(res.get("limits", {}).get("nvidia.com/gpu", 0))


def test_raycluster_autoscaler_v2_cpu_head_gpu_workers_from_zero():
    rc = _kind("kuberay-raycluster.yaml", "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert spec["rayVersion"] == "2.60.0"  # the ray pinned in constraints.txt
    assert "ray==2.60.0" in (ROOT / "constraints.txt").read_text()

    head = spec["headGroupSpec"]
    assert str(head["rayStartParams"]["num-gpus"]) == "0"
    head_containers = head["template"]["spec"]["containers"]
    assert all(_gpus(c) == 0 for c in head_containers), "the head must not ask for GPUs"
    mounts = {m["mountPath"] for c in head_containers for m in c.get("volumeMounts", [])}
    assert "/etc/batchgen/jobs" in mounts

    (gpu,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0
    assert gpu["maxReplicas"] >= 2
    (worker,) = gpu["template"]["spec"]["containers"]
    assert _gpus(worker) >= 1
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == worker["resources"]["limits"]["nvidia.com/gpu"]
    assert worker["image"] == head_containers[0]["image"]


def test_rayjob_runs_batchgen_run_on_the_cluster_with_a_valid_spec():
    rc = _kind("kuberay-raycluster.yaml", "RayCluster")
    job = _kind("kuberay-rayjob.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["batchgen", "run"]
    spec_file = Path(entry[2])
    assert str(spec_file.parent) == "/etc/batchgen/jobs"

    cm = _kind("kuberay-rayjob.yaml", "ConfigMap")
    volumes = rc["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    assert any(v.get("configMap", {}).get("name") == cm["metadata"]["name"] for v in volumes)
    spec = spec_from_dict(yaml.safe_load(cm["data"][spec_file.name]), "ConfigMap job.yaml")
    for uri in (spec.input.uri, spec.model.uri, spec.output.uri):
        assert uri.startswith("s3://"), f"{uri}: pods share no disk; use s3://"
    (gpu,) = rc["spec"]["workerGroupSpecs"]
    gpus_per_pod = _gpus(gpu["template"]["spec"]["containers"][0])
    assert spec.compute.gpus_per_worker > 0
    assert spec.compute.max_workers * spec.compute.gpus_per_worker <= gpu["maxReplicas"] * gpus_per_pod


def test_aws_cluster_launcher_config_gpu_spot_workers():
    import ray

    schema = json.loads((Path(os.path.dirname(ray.__file__)) / "autoscaler" / "ray-schema.json").read_text())
    (cfg,) = _docs("aws-cluster.yaml")
    import jsonschema

    jsonschema.validate(cfg, schema)  # the launcher's own schema
    assert cfg["provider"]["type"] == "aws"
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU") == 0
    assert any("--num-gpus=0" in c for c in cfg["head_start_ray_commands"])
    assert any("--autoscaling-config" in c for c in cfg["head_start_ray_commands"])
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    (gpu,) = workers.values()
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 2
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert re.match(r"^(g\d|p\d)", gpu["node_config"]["InstanceType"]), "not a GPU instance type"
    assert cfg["max_workers"] >= gpu["max_workers"]


def test_dockerfile_cuda_base_and_pinned_install():
    text = (INFRA / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert froms and froms[-1].startswith("nvidia/cuda:"), froms
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs)
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), flags=re.M).group(1)
    assert f"torch=={pinned}" in text
    assert re.search(r"COPY\s+batchgen\s", text)


def test_readme_cluster_section_names_the_commands():
    section = (ROOT / "docs" / "cluster.md").read_text()  # the user guide's cluster page (was a README section)
    for needle in ("batchgen submit", "--address", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml",
                   "aws-cluster.yaml", "infra/Dockerfile", "batchgen status"):
        assert needle in section, f"docs/cluster.md does not mention {needle!r}"


@pytest.mark.parametrize("name", ["kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "aws-cluster.yaml"])
def test_no_credentials_in_infra(name):
    text = (INFRA / name).read_text()
    assert not re.search(r"AKIA[0-9A-Z]{12,}", text)
    assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*\S", text)
