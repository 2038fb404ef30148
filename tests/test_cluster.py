"""The cluster setup, without a cloud account.

- ``cluster.yaml`` passes Ray's own autoscaler schema validation and config preparation
  (offline: no AWS call), and every path and version in it exists in the repository; its
  commands are valid bash, the env they write gives the driver the cluster's defaults, and the
  head's MLflow command starts a server that answers its allowed hosts only.
- A search through ``tuner.search`` on a local multi-node Ray (``ray.cluster_utils.Cluster``:
  a head without and two workers with a custom resource ``fake_gpu`` standing in for a GPU):
  trials land on both workers, checkpoints go to the shared ``--storage``, and a worker removed
  mid-search loses no finished trial while its trial resumes from a checkpoint on another node.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.ray_record import assert_resumed_from_checkpoints
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
REMOTE_REPO = "~/mifusion-search"
TOKEN_MOUNT = "~/mifusion-auth/auth_token"


# --------------------------------------------------------------------------- cluster.yaml
@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _all_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
    commands = [c for key in keys for c in config.get(key) or []]
    for node_type in config["available_node_types"].values():
        for key in ("initialization_commands", "worker_setup_commands"):
            commands += node_type.get(key) or []
    return commands


def test_cluster_yaml_passes_rays_validation_and_preparation(cluster_config):
    import copy

    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster_config))  # defaults of the aws provider
    validate_config(prepared)  # ray-schema.json + Ray's own consistency checks

    assert prepared["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    workers = {n: t for n, t in types.items() if n != prepared["head_node_type"]}
    assert head["node_config"]["InstanceType"].startswith("m5.")
    assert head["resources"].get("CPU") == 0  # no trial ever runs on the head
    gpus = {t["node_config"]["InstanceType"]: t for t in workers.values()}
    assert set(gpus) == {"g5.xlarge", "g5.12xlarge"}  # 1x and 4x A10G
    for worker in workers.values():
        assert worker["min_workers"] == 0 and worker["max_workers"] >= 1  # scales from 0
        assert worker["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert prepared["idle_timeout_minutes"] > 0
    # prepare_config put setup_commands in front of both node kinds' own commands
    assert prepared["head_setup_commands"][:len(cluster_config["setup_commands"])] == \
        cluster_config["setup_commands"]


def test_each_node_gets_only_what_it_needs(cluster_config):
    """Workers: their own instance profile; the head: its own (not ray-autoscaler-v1); IMDSv2
    and the user's security group on every node type; Ray's token auth on every node."""
    types = cluster_config["available_node_types"]
    head = cluster_config["head_node_type"]
    groups = set()
    for name, node_type in types.items():
        config = node_type["node_config"]
        profile = config["IamInstanceProfile"]["Arn"]
        assert profile.endswith("/mifusion-head" if name == head else "/mifusion-worker"), name
        assert config["MetadataOptions"]["HttpTokens"] == "required", name
        groups.add(tuple(config["SecurityGroupIds"]))
    assert len(groups) == 1 and all(g.startswith("sg-") for g in groups.pop())
    starts = cluster_config["head_start_ray_commands"] + cluster_config["worker_start_ray_commands"]
    for command in (c for c in starts if "ray start" in c):
        assert command.startswith("source ~/mifusion.env;"), command  # RAY_AUTH_MODE=token
    text = CLUSTER_YAML.read_text()
    assert "ray-autoscaler-v1" not in text.split("# ---- notes")[0].replace(
        "its default ray-autoscaler-v1", "")


def test_every_key_of_cluster_yaml_has_a_comment_above_it():
    lines = CLUSTER_YAML.read_text().splitlines()
    key = re.compile(r"^(\s*)(- )?([A-Za-z_][\w.-]*|\"[^\"]+\"|~?/?[\w./~-]+):(\s|$)")
    in_block = None  # indentation of a `>-` / `|` block scalar we are inside
    missing = []
    for i, line in enumerate(lines):
        indent = len(line) - len(line.lstrip())
        if in_block is not None:
            if line.strip() and indent <= in_block:
                in_block = None
            else:
                continue
        match = key.match(line)
        if match and not line.lstrip().startswith("#"):
            above = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            if not above.startswith("#"):
                missing.append(f"line {i + 1}: {line.strip()}")
        if re.search(r":\s*[>|][-+]?\s*$", line) or re.search(r"^\s*- [>|][-+]?\s*$", line):
            in_block = indent
    assert not missing, "keys without a comment above them:\n" + "\n".join(missing)


def test_image_is_rays_gpu_image_of_the_pinned_version(cluster_config):
    pyproject = (ROOT / "pyproject.toml").read_text()
    (low, high), = re.findall(r'"ray\[tune\]>=([\d.]+),<([\d.]+)"', pyproject)
    image = cluster_config["docker"]["image"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", image)
    assert match, f"{image}: expected rayproject/ray:X.Y.Z-pyXY-gpu"
    version = tuple(int(p) for p in match.group(1).split("."))
    as_tuple = lambda text: tuple(int(p) for p in text.split("."))  # noqa: E731
    assert as_tuple(low) <= version < as_tuple(high), f"{image} outside ray>={low},<{high}"
    wanted = re.search(r'requires-python = ">=(\d)\.(\d+)"', pyproject).groups()
    assert (int(match.group(2)), int(match.group(3))) >= (int(wanted[0]), int(wanted[1]))


def test_file_mounts_and_setup_commands_refer_to_files_in_the_repo(cluster_config):
    mounts = dict(cluster_config["file_mounts"])
    assert mounts.get(REMOTE_REPO) == "."  # the repo, synced from where `ray up` runs
    # Ray's token, from where `ray get-auth-token --generate` writes it on the user's machine
    assert mounts.pop(TOKEN_MOUNT) == "~/.ray/auth_token"
    for remote, local in mounts.items():
        assert (ROOT / local).exists(), f"file_mounts {remote}: {local} is not in the repository"
    assert cluster_config.get("rsync_filter") == [".gitignore"]
    assert (ROOT / ".gitignore").is_file()

    commands = _all_commands(cluster_config)
    installs = [c for c in commands if "pip install" in c]
    # the lock (hashes required, torch's CPU wheel left out), torch's CUDA build of the lock's
    # version, then the project without dependencies: nothing resolved from version ranges
    assert any("--require-hashes -r" in c and f"{REMOTE_REPO}/requirements.lock" in c
               and "/^torch==/" in c for c in installs)
    (torch,) = [c for c in installs if "\"torch==" in c]
    assert '"torch==$TORCH+cu128" --index-url https://download.pytorch.org/whl/cu128' in torch
    assert f"{REMOTE_REPO}/requirements.lock" in torch
    assert any(f"pip install -q --no-deps -e {REMOTE_REPO}" in c for c in installs)
    for command in installs:
        assert re.search(r"--no-deps|--require-hashes|torch==|'boto3", command), command
    referenced = 0
    for command in commands:
        for path in re.findall(re.escape(REMOTE_REPO) + r"(/[\w./-]*)?", command):
            target = ROOT / path.lstrip("/")
            assert target.exists(), f"{command!r}: {target.relative_to(ROOT)} does not exist"
            referenced += 1
        for module in re.findall(r"python -m ([\w.]+)", command):
            assert (ROOT / (module.replace(".", "/") + ".py")).is_file() or \
                module in ("pip", "mlflow", "ray"), f"{command!r}: no module {module}"
    assert referenced >= 1
    assert (ROOT / "pyproject.toml").is_file()


def test_services_bind_private_addresses_and_the_env_is_exported(cluster_config):
    for command in _all_commands(cluster_config):
        assert "0.0.0.0" not in command and "--host=0" not in command, command
    mlflow = [c for c in cluster_config["head_start_ray_commands"] if "mlflow server" in c]
    assert len(mlflow) == 1
    args = shlex.split(mlflow[0].split("mlflow server", 1)[1].split(">", 1)[0])
    host = args[args.index("--host") + 1]
    assert host == "127.0.0.1"  # only the driver, on the head, talks to it
    assert args[args.index("--port") + 1] == "5000"
    assert args[args.index("--allowed-hosts") + 1] == "localhost:5000,127.0.0.1:5000"
    assert any(a.startswith("s3://") or a.startswith("$MIFUSION_S3") for a in
               (args[args.index("--artifacts-destination") + 1],))
    ray_start = [c for c in cluster_config["head_start_ray_commands"] if "ray start --head" in c]
    assert len(ray_start) == 1 and "--dashboard-host=127.0.0.1" in ray_start[0]

    env_lines = "\n".join(_all_commands(cluster_config))
    for var in ("MLFLOW_TRACKING_URI=http://127.0.0.1:5000", "OPTUNA_STORAGE=",
                "TUNER_STORAGE=$MIFUSION_S3/", "RAY_AUTH_MODE=token",
                f"RAY_AUTH_TOKEN_PATH=$HOME/{TOKEN_MOUNT[2:]}"):
        assert var in env_lines, f"{var} is not exported"
    # workers learn the head's address from the autoscaler ($RAY_HEAD_IP)
    assert "RAY_HEAD_IP" in env_lines


def test_setup_commands_are_bash_and_write_the_env_the_driver_reads(cluster_config, tmp_path):
    """Every command parses as bash; the env command, run as on a worker ($RAY_HEAD_IP set) and
    as on the head (the private IP from Ray), gives the driver the cluster's defaults."""
    for command in _all_commands(cluster_config):
        check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert check.returncode == 0, f"{command!r}: {check.stderr}"
    (env_command,) = [c for c in cluster_config["setup_commands"] if "> ~/mifusion.env" in c]
    (bashrc_command,) = [c for c in cluster_config["setup_commands"] if ".bashrc" in c]
    probe = ("source ~/mifusion.env && python -c 'from tuner.search import build_parser, "
             "storage_for, study_storage_for; a = build_parser().parse_args([\"--space\", "
             "\"smoke\"]); print(a.mlflow_uri, storage_for(a), study_storage_for(a))'")
    base = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for head_ip in ("10.1.2.3", None):  # a worker, then the head
        home = tmp_path / f"home-{head_ip}"
        home.mkdir()
        env = {**base, "HOME": str(home), **({"RAY_HEAD_IP": head_ip} if head_ip else {})}
        for command in (env_command, bashrc_command, bashrc_command):
            subprocess.run(["bash", "-c", command], env=env, check=True, timeout=120)
        assert (home / ".bashrc").read_text() == "source ~/mifusion.env\n"  # once
        out = subprocess.run(["bash", "-c", probe], env=env, capture_output=True, text=True,
                             timeout=120, check=True).stdout.split()
        mlflow_uri, storage, study = out
        assert mlflow_uri == "http://127.0.0.1:5000"  # the head's own MLflow, for its driver
        head = (home / "mifusion.env").read_text()
        ip = re.search(r"HEAD_IP=([\d.]+)", head).group(1)
        assert ip == head_ip if head_ip else ip not in ("0.0.0.0", "")
        assert storage == "s3://my-mifusion-bucket/mifusion/ray_results"
        assert study == "sqlite:////home/ray/state/optuna.db"


@pytest.mark.slow
def test_the_head_starts_an_mlflow_server_that_answers_its_allowed_hosts_only(cluster_config,
                                                                              tmp_path):
    """The head's MLflow command as written (paths and port moved into tmp), on 127.0.0.1."""
    import signal
    import socket
    import urllib.error
    import urllib.request

    home, state = tmp_path / "home", tmp_path / "state"
    (home / "state").mkdir(parents=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(home),
           "RAY_HEAD_IP": "127.0.0.1"}
    (env_command,) = [c for c in cluster_config["setup_commands"] if "> ~/mifusion.env" in c]
    subprocess.run(["bash", "-c", env_command], env=env, check=True, timeout=120)
    (command,) = [c for c in cluster_config["head_start_ray_commands"] if "mlflow server" in c]
    command = command.replace("/home/ray/state", str(state)).replace(":5000", f":{port}") \
        .replace("--port 5000", f"--port {port}")
    state.mkdir()
    subprocess.run(["bash", "-c", command], env=env, check=True, timeout=60)
    pid = int((home / "state" / "mlflow.pid").read_text())

    def get(host: str, path: str = "/api/2.0/mlflow/experiments/search?max_results=1") -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # slow when loaded
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        def health() -> int | None:
            try:
                return get(f"127.0.0.1:{port}", "/health")
            except OSError:
                return None

        def log_tail() -> str:
            log = home / "state" / "mlflow.log"
            return log.read_text()[-2000:] if log.exists() else "no mlflow.log"

        # MLflow's server starts in ~10 s, ~100 s on a loaded CI
        status = wait_until(health, timeout=300, interval=0.5, message=log_tail)
        assert status == 200
        assert get(f"127.0.0.1:{port}") == 200
        assert get(f"localhost:{port}") == 200  # what an SSH tunnel sends
        assert get("attacker.example.com") in (400, 403)  # DNS rebinding refused
        assert (state / "mlflow.db").is_file()
    finally:
        def group_gone() -> bool:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return True
            return False

        os.killpg(pid, signal.SIGTERM)  # setsid: the server and its workers are one group
        if not wait_until(group_gone, timeout=60, interval=0.5, raise_on_timeout=False):
            os.killpg(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- driver defaults
def test_driver_defaults_come_from_the_environment(monkeypatch, tmp_path):
    from tuner.search import build_parser, find_resumable, storage_for, study_storage_for

    for var in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE", "TUNER_STORAGE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["--space", "smoke"])
    assert args.mlflow_uri is None and args.address is None
    assert storage_for(args) == str(tmp_path / "ray_results")
    assert study_storage_for(args) == f"sqlite:///{tmp_path / 'optuna.db'}"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.5:5000")
    monkeypatch.setenv("OPTUNA_STORAGE", "sqlite:////home/ray/state/optuna.db")
    monkeypatch.setenv("TUNER_STORAGE", "s3://bucket/ray_results")
    args = build_parser().parse_args(["--space", "smoke", "--address", "auto"])
    assert args.mlflow_uri == "http://10.0.0.5:5000" and args.address == "auto"
    assert storage_for(args) == "s3://bucket/ray_results"
    assert study_storage_for(args) == "sqlite:////home/ray/state/optuna.db"
    # a flag wins over the environment
    args = build_parser().parse_args(["--space", "smoke", "--mlflow-uri", "sqlite:///x.db",
                                      "--storage", str(tmp_path / "elsewhere")])
    assert args.mlflow_uri == "sqlite:///x.db" and storage_for(args) == str(tmp_path / "elsewhere")

    # --resume without --name finds the newest search in a storage given as a URI too
    # explicit, a second apart, modification times: no sleep, whatever the file system's
    # time resolution (the local listing orders folders, the URI one their tuner.pkl)
    now = time.time()
    # "smoke-x y" (newest) cannot be a search's name (NAME_PATTERN): never picked
    for age, name in ((30, "smoke-1"), (20, "smoke-2"), (10, "other-3"), (5, "smoke-x y")):
        (tmp_path / "store" / name).mkdir(parents=True)
        (tmp_path / "store" / name / "tuner.pkl").write_bytes(b"x")
        for path in (tmp_path / "store" / name / "tuner.pkl", tmp_path / "store" / name):
            os.utime(path, (now - age, now - age))
    (tmp_path / "store" / "smoke-9").mkdir()  # not a Tune experiment
    assert find_resumable("smoke", (tmp_path / "store").as_uri()) == "smoke-2"
    assert find_resumable("smoke", str(tmp_path / "store")) == "smoke-2"


def test_a_cluster_that_scales_from_zero_accepts_trials_its_autoscaler_can_place(
        cluster_config, tmp_path):
    """At `ray up` the head (0 CPUs) is the only node: a GPU trial must still be accepted,
    because the autoscaler can start a node type that fits it; one that fits no type is not."""
    import copy
    import json

    from ray.autoscaler._private.util import prepare_config

    from tuner.search import UsageError, autoscaler_node_resources, check_trial_fits
    from tuner.spaces import apply_overrides, load_space

    # what `ray up` leaves on the head: the prepared config, as JSON
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(json.dumps(prepare_config(copy.deepcopy(cluster_config))))
    types = autoscaler_node_resources(bootstrap)
    assert sorted(types, key=lambda t: t["GPU"]) == [{"CPU": 4.0, "GPU": 1.0},
                                                     {"CPU": 48.0, "GPU": 4.0}]
    assert autoscaler_node_resources(tmp_path / "missing.yaml") == []

    head_only = [{"CPU": 0.0, "memory": 1e10, "object_store_memory": 1e9}]
    space = lambda *sets: apply_overrides(load_space("smoke"), list(sets))  # noqa: E731
    gpu_trial = space("resources.gpu=1", "resources.cpu=4")
    with pytest.raises(UsageError, match="resources.cpu 4: no node"):
        check_trial_fits(gpu_trial, head_only)  # a cluster that cannot grow
    with pytest.raises(UsageError, match="has no GPU"):
        check_trial_fits(gpu_trial, [{"CPU": 8.0}])
    check_trial_fits(gpu_trial, head_only + types)
    check_trial_fits(space("resources.gpu=4", "resources.cpu=16"), head_only + types)
    with pytest.raises(UsageError, match="many GPUs"):
        check_trial_fits(space("resources.gpu=8"), head_only + types)
    fake = space("resources.custom={fake_gpu: 1}")
    with pytest.raises(UsageError, match="resources.custom.fake_gpu 1: no node"):
        check_trial_fits(fake, head_only + types)
    check_trial_fits(fake, head_only + [{"CPU": 1.0, "fake_gpu": 1.0}])


def test_custom_resources_in_a_space(tmp_path):
    from tuner.spaces import SpaceError, apply_overrides, load_space

    space = apply_overrides(load_space("smoke"), ["resources.custom={accel_a10g: 1}"])
    assert space.resources.ray_resources() == {"cpu": 1.0, "gpu": 0.0, "accel_a10g": 1.0}
    for bad in ("resources.custom={GPU: 1}", "resources.custom={accel: 0}",
                "resources.custom=[a]"):
        with pytest.raises(SpaceError, match="resources"):
            apply_overrides(load_space("smoke"), [bad])


# --------------------------------------------------------------------------- multi-node search
@pytest.fixture
def fake_gpu_cluster(monkeypatch):
    """A head with a CPU but no ``fake_gpu``, and two worker nodes with one CPU and one
    ``fake_gpu`` each (a CPU-only trial could run on the head; one that asks for the fake GPU
    cannot)."""
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, resources={"fake_gpu": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def _trial_runs(client, experiment_name: str) -> list:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    return [r for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("run_kind") == "trial"]


@pytest.mark.slow
def test_search_on_a_multi_node_cluster_survives_losing_a_node(tmp_path, monkeypatch, small_data,
                                                               fake_gpu_cluster):
    import optuna
    from mlflow.tracking import MlflowClient

    from trainables.data.parquet import write_parquet
    from tuner.search import main

    cluster, (worker_a, worker_b) = fake_gpu_cluster
    # 10 epochs: the node goes while the trial still has epochs to run on the other one (a few
    # 0.05 s epochs of the small set could all be done before the removal lands)
    epochs, trials = 10, 3
    data_dir = write_parquet(small_data, tmp_path / "data")
    space = {
        "name": "multinode", "backbones": ["ef_lstm"], "regularisers": ["none"],
        "data": str(data_dir),
        "ranges": {"lr": {"low": 1e-3, "high": 5e-3, "log": True}},
        "fixed": {"batch_size": 32, "patience": 0, "backbone.hidden": 16,
                  "backbone.num_layers": 1},
        "search": {"sampler": "random", "pruner": "none", "num_samples": trials,
                   "max_epochs": epochs, "seed": 0},
        # a trial needs what only a worker node has: the stand-in for a GPU
        "resources": {"cpu": 1, "custom": {"fake_gpu": 1}},
    }
    (tmp_path / "multinode.yaml").write_text(yaml.safe_dump(space))
    shared = tmp_path / "shared"  # one folder all nodes see, as s3:// or NFS on a real cluster
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPTUNA_STORAGE", f"sqlite:///{tmp_path / 'study.db'}")
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    removed: dict = {}

    def remove_a_busy_worker():
        """Once a trial has finished and another has run 2 epochs, remove the latter's node (a
        reclaimed spot node); its trial must go on on the other worker. (Nodes cannot be added
        from this thread: Ray's Node installs signal handlers, main thread only.)"""
        client = MlflowClient(mlflow_uri)

        def one_done_and_one_busy():
            try:
                runs = _trial_runs(client, "multinode")
                done = {r.data.tags["ray_trial_id"] for r in runs
                        if r.data.tags.get("status") == "completed"}
                busy = [r for r in runs if r.data.tags.get("status") == "running"
                        and r.data.tags.get("ray_node_id")
                        and len(client.get_metric_history(r.info.run_id, "valid_mae")) >= 2]
            except Exception:  # the store is being created
                return None
            return (done, busy) if done and busy else None

        found = wait_until(one_done_and_one_busy, timeout=300, interval=0.2,
                           raise_on_timeout=False)
        if found:
            done, busy = found
            node_id = busy[0].data.tags["ray_node_id"]
            node = next(n for n in (worker_a, worker_b) if n.node_id == node_id)
            removed.update(trial=busy[0].data.tags["ray_trial_id"], node=node_id,
                           done_before=done)
            cluster.remove_node(node)

    thread = threading.Thread(target=remove_a_busy_worker, daemon=True)
    thread.start()
    # `--address auto` finds the cluster as on a head node or in a `ray job submit` job (there
    # through RAY_ADDRESS; here too, so that no other Ray on this machine is picked up)
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    code = main(["--space", "multinode.yaml", "--name", "mn", "--address", "auto",
                 "--storage", str(shared), "--mlflow-uri", mlflow_uri])
    thread.join(timeout=10)
    assert code == 0
    assert removed, "no trial was running on a worker with 2 epochs done"

    client = MlflowClient(mlflow_uri)
    runs = _trial_runs(client, "multinode")
    by_trial = {r.data.tags["ray_trial_id"]: r for r in runs}
    assert len(runs) == len(by_trial) == trials  # every trial once: none lost, none duplicated
    assert all(r.data.tags["status"] == "completed" for r in runs)

    # trials ran on both workers, never on the head (which has no fake_gpu)
    nodes = {n for r in runs for n in r.data.tags["ray_nodes"].split(",")}
    assert {worker_a.node_id, worker_b.node_id} <= nodes
    assert cluster.head_node.node_id not in nodes

    # the trial on the removed node went on elsewhere from its checkpoint, not from epoch 1
    moved = by_trial[removed["trial"]]
    moved_nodes = moved.data.tags["ray_nodes"].split(",")
    (left,) = {worker_a.node_id, worker_b.node_id} - {removed["node"]}
    assert moved_nodes == [removed["node"], left]
    assert moved.data.tags["ray_node_id"] != removed["node"]
    # retried from its checkpoint: once, or twice when a retry was placed before Ray declared
    # the node dead or its new worker died too (seen once under heavy load); never from scratch
    assert moved.data.tags.get("retries") in ("1", "2")
    steps = [m.step for m in client.get_metric_history(moved.info.run_id, "valid_mae")]
    assert set(steps) == set(range(1, epochs + 1))
    assert len(steps) <= epochs + 1  # at most the epoch in flight ran twice
    # Ray's own record (MLflow's skips logged epochs): each attempt after the node loss went on
    # after the trial's last checkpoint, never from epoch 1
    (moved_dir,) = (shared / "mn").glob(f"{removed['trial']}-*")
    assert_resumed_from_checkpoints(moved_dir, epochs)

    # trials finished before the loss were not re-run
    for trial_id in removed["done_before"]:
        steps = [m.step for m in client.get_metric_history(by_trial[trial_id].info.run_id,
                                                           "valid_mae")]
        assert sorted(steps) == list(range(1, epochs + 1))
        (trial_dir,) = (shared / "mn").glob(f"{trial_id}-*")
        assert assert_resumed_from_checkpoints(trial_dir, epochs) == 0  # one attempt

    # checkpoints and results are in the shared --storage, one folder per trial
    experiment = shared / "mn"
    assert (experiment / "tuner.pkl").is_file()
    for trial_id in by_trial:
        (trial_dir,) = experiment.glob(f"{trial_id}-*")
        checkpoints = sorted(trial_dir.glob("checkpoint_*"))
        assert checkpoints, f"no checkpoint of {trial_id} in {trial_dir}"
        assert (checkpoints[-1] / "best.pt").is_file()
    assert not (tmp_path / "ray_results").exists()

    # the Optuna study (in $OPTUNA_STORAGE, opened by the driver only) has every trial
    study = optuna.load_study(study_name="mn", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * trials
