"""The cluster launcher files and the paper-setting configs: checked offline, no cloud credentials.

``cluster.yaml`` and ``configs/cluster-gcp.yaml`` go through Ray's own launcher checks:
``validate_config`` (ray-schema.json plus the head/min_workers rules) on the file as written and
after ``prepare_config`` (``fillout_defaults`` with the provider's defaults.yaml, setup-command
merging, Docker checks, per-type worker bounds), as ``ray up`` does before it calls the cloud.
The AWS node configs are also checked against botocore's RunInstances input shape, which is
what the launcher's ``create_instances`` call is validated against. The paper configs must
load as S2LConfig / FinetuneConfig (unknown keys raise) and fit the cluster's GPU workers,
bin-packed with the autoscaler's own packing function.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.resource_demand_scheduler import get_bin_pack_residual
from ray.autoscaler._private.util import prepare_config, validate_config

from s2l_ray.config import ConfigError, FinetuneConfig, S2LConfig, load_config

jsonschema = pytest.importorskip("jsonschema")  # validate_config's schema checker (ray[default])

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = {"aws": ROOT / "cluster.yaml", "gcp": ROOT / "configs" / "cluster-gcp.yaml"}
PAPER = ROOT / "configs" / "paper_mathinstruct.yaml"
PAPER_FT = ROOT / "configs" / "finetune_paper_phi2.yaml"
GPU_EXTRA_INSTALL = re.compile(r'pip install .*-e "\$HOME/s2l-ray\[gpu\]"')


def raw(name: str) -> dict:
    return yaml.safe_load(CLUSTERS[name].read_text())


def launcher_check(config: dict) -> dict:
    """What `ray up` does before it talks to the cloud: validate, fill defaults, validate again."""
    validate_config(config)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def gpu_types(config: dict) -> dict[str, dict]:
    return {n: t for n, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}


# --- Ray's launcher validation ----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_cluster_file_passes_ray_validation(name):
    prepared = launcher_check(raw(name))
    assert prepared["provider"]["type"] == name
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # prepare_config merged the shared setup commands into both node roles
    for role in ("head_setup_commands", "worker_setup_commands"):
        assert any(GPU_EXTRA_INSTALL.search(c) for c in prepared[role]), role


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_cluster_file_structure(name):
    cfg = raw(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head runs drivers and Ray's services, not tasks"
    assert "min_workers" not in head and "max_workers" not in head

    gpus = gpu_types(cfg)
    assert len(gpus) == 1
    (gpu,) = gpus.values()
    assert isinstance(gpu["resources"]["GPU"], int) and gpu["resources"]["GPU"] >= 1
    assert gpu["resources"]["CPU"] >= 4 * gpu["resources"]["GPU"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= cfg["max_workers"]
    assert 0 < cfg["idle_timeout_minutes"] <= 30

    # the repo is synced to ~/s2l-ray and installed from there with the gpu extra, torch pinned first
    assert cfg["file_mounts"]["~/s2l-ray"] == "."
    setup = cfg["setup_commands"]
    install = next(i for i, c in enumerate(setup) if GPU_EXTRA_INSTALL.search(c))
    torch_first = next(i for i, c in enumerate(setup) if re.search(r"pip install .*torch==\d", c))
    assert torch_first < install
    assert "PIP_CONSTRAINT=" in setup[install]
    assert any("torch==" in c and "constraints" in c for c in setup[:install])

    # the container's Ray is the client's Ray (ray job submit / ray up need matching versions)
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-py311")

    # token auth on every node; the Jobs API stays on the head's localhost (reached by SSH tunnel)
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
    assert "0.0.0.0" not in starts
    assert "~/.ray/auth_token" in cfg["file_mounts"]


def test_aws_node_configs_match_the_ec2_api():
    botocore = pytest.importorskip("botocore.session")
    from botocore.validate import ParamValidator

    shape = botocore.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    for name, node_type in raw("aws")["available_node_types"].items():
        # what the launcher passes to create_instances once bootstrap has filled in the network
        conf = dict(node_type["node_config"], MinCount=1, MaxCount=1, SubnetId="subnet-0", KeyName="k",
                    SecurityGroupIds=["sg-0"])
        report = ParamValidator().validate(conf, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
    broken = dict(raw("aws")["available_node_types"]["ray.worker.gpu"]["node_config"], MinCount=1, MaxCount=1)
    broken["InstanceTyp"] = broken.pop("InstanceType")
    assert ParamValidator().validate(broken, shape).has_errors()


def _unknown_top_level_key(c):
    c["idle_timeout"] = 5


def _fractional_gpu_resource(c):
    next(iter(gpu_types(c).values()))["resources"]["GPU"] = 0.5


def _head_type_missing(c):
    c["head_node_type"] = "no.such.type"


def _min_workers_above_max(c):
    next(iter(gpu_types(c).values()))["min_workers"] = c["max_workers"] + 1


def _node_type_without_resources(c):
    del next(iter(gpu_types(c).values()))["resources"]


def _unknown_node_type_key(c):
    next(iter(gpu_types(c).values()))["gpus"] = 4


def _setup_commands_not_a_list(c):
    c["setup_commands"] = "pip install -e ~/s2l-ray[gpu]"


BREAKAGES = [_unknown_top_level_key, _fractional_gpu_resource, _head_type_missing, _min_workers_above_max,
             _node_type_without_resources, _unknown_node_type_key, _setup_commands_not_a_list]


@pytest.mark.parametrize("name", sorted(CLUSTERS))
@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__.strip("_"))
def test_broken_copy_is_rejected(name, breakage):
    cfg = raw(name)
    breakage(cfg)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        launcher_check(cfg)


# --- the paper-setting configs ----------------------------------------------------------------

def test_paper_selection_config_loads():
    cfg = load_config(str(PAPER))
    assert isinstance(cfg, S2LConfig)
    p = cfg.proxy
    assert p.model.startswith("s3://") and "pythia-70m" in p.model
    assert cfg.text.tokenizer == p.model
    assert (p.epochs, p.lr, p.schedule, p.warmup_ratio, p.num_points) == (3, 2e-5, "cosine", 0.03, 12)
    assert cfg.text.max_length == 512 and "{prompt}" in cfg.text.template
    assert p.precision == "auto" and p.use_gpu == "true"
    assert (cfg.cluster.k, cfg.cluster.per_source) == (100, True)
    assert cfg.select.method == "s2l" and cfg.select.budgets == [30000]
    assert 0.10 < cfg.select.budgets[0] / 262_000 < 0.12
    assert (cfg.corpus.prompt, cfg.corpus.response, cfg.corpus.source) == ("instruction", "output", "source")
    # one training worker and one scoring actor share each GPU
    assert p.workers.count == cfg.scoring.actors.count
    assert p.workers.gpus + cfg.scoring.actors.gpus == pytest.approx(1.0)


def test_paper_finetune_config_loads():
    ft = load_config(str(PAPER_FT), cls=FinetuneConfig)
    sel = load_config(str(PAPER))
    assert ft.model.startswith("s3://") and "phi-2" in ft.model
    assert (ft.zero_stage, ft.epochs, ft.lr, ft.precision) == (3, 3, 2e-5, "auto")
    assert ft.use_gpu in ("auto", "true", "false") and ft.use_gpu == "true"  # models.resolve_gpu's values
    assert ft.corpus.path == sel.output, "the target trains on the selection run's output"
    assert ft.budget == 0 and len(sel.select.budgets) == 1  # one budget: the run dir's selected.jsonl
    assert ft.text.template == sel.text.template and ft.text.max_length == sel.text.max_length
    assert (ROOT / "configs" / f"ds_zero{ft.zero_stage}.json").is_file()


def test_paper_configs_reject_unknown_keys(tmp_path):
    data = yaml.safe_load(PAPER.read_text())
    data["proxy"]["gpu_per_worker"] = 0.75
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="gpu_per_worker"):
        load_config(str(bad))
    ft = yaml.safe_load(PAPER_FT.read_text())
    ft["zero"] = 3
    bad.write_text(yaml.safe_dump(ft))
    with pytest.raises(ConfigError, match="zero"):
        load_config(str(bad), cls=FinetuneConfig)


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_paper_jobs_fit_the_gpu_workers(name):
    """The autoscaler's bin packing places every Ray Train / scoring bundle on two GPU nodes."""
    cfg = raw(name)
    (gpu,) = gpu_types(cfg).values()
    nodes = [dict(gpu["resources"]) for _ in range(2)]
    sel = load_config(str(PAPER))
    select_bundles = ([sel.proxy.workers.ray_resources(True, "proxy.workers")] * sel.proxy.workers.count
                      + [sel.scoring.actors.ray_resources(True, "scoring.actors")] * sel.scoring.actors.count)
    ft = load_config(str(PAPER_FT), cls=FinetuneConfig)
    finetune_bundles = [ft.workers.ray_resources(True, "workers")] * ft.workers.count
    for bundles in (select_bundles, finetune_bundles):
        unfit, _ = get_bin_pack_residual(nodes, bundles)
        assert unfit == []
        assert 2 <= gpu["max_workers"]
    # nothing that asks for a CPU can land on the head
    head = cfg["available_node_types"][cfg["head_node_type"]]["resources"]
    assert get_bin_pack_residual([dict(head)], [{"CPU": 0.25}])[0] == [{"CPU": 0.25}]


@pytest.mark.parametrize("job,config,expected", [
    ("select", "paper_mathinstruct.yaml", ["corpus:   s3://my-bucket/mathinstruct/", "12 points, 8 workers",
                                              "k=100 per source, backend auto"]),
    ("finetune", "finetune_paper_phi2.yaml", ["-> s3://my-bucket/s2l-runs/mathinstruct-phi2", "ZeRO-3",
                                                 "batch 128 (4 x 4 accumulated x 8), bf16"]),
    ("benchmark", "benchmark_gpu.yaml", ["= 57 targets -> s3://my-bucket/s2l-runs/benchmark-gpu", "ZeRO-2"]),
])
def test_cloud_configs_pass_a_dry_run_of_their_stage(job, config, expected, capsys):
    """The cloud configs as a user runs them (`--dry-run`: the stage's checks without data, models or Ray), through
    the job's own main."""
    from helpers import job as job_module

    rc = job_module(job).main(["--config", str(ROOT / "configs" / config), "--dry-run"])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    assert all(e in out.out for e in expected), out.out


@pytest.mark.parametrize("config", ["paper_mathinstruct.yaml", "finetune_paper_phi2.yaml", "benchmark_gpu.yaml"])
def test_cloud_configs_name_no_local_path(config):
    """On a cluster whose nodes share no disk, models, data and outputs are URIs."""
    text = (ROOT / "configs" / config).read_text()
    paths = re.findall(r"^\s*(?:output|path|model|tokenizer):\s*(\S+)", text, re.M)
    assert paths and all(p.startswith("s3://") for p in paths), paths


@pytest.mark.parametrize("name", sorted(CLUSTERS))
def test_gpu_workers_check_the_driver_the_torch_build_needs(name):
    cfg = raw(name)
    assert any("driver_version" in c and "580" in c for c in cfg["worker_setup_commands"])
    assert not any(m.startswith("/mnt") for m in cfg["file_mounts"])  # no node-local model folders
