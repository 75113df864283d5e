"""Static and offline checks of ``deploy/``: compose stack, Dagster instance, Helm values,
DeepSpeed launcher and hostfile.

Nothing here starts a container, a cluster or a GPU job. What can be checked without them is:
every YAML parses; the compose services carry the commands and environment the stack relies
on; ``dagster.yaml`` / ``workspace.yaml`` pass Dagster's own config schemas; the Helm values
only use value names of the official chart's schema; ``launch.sh`` builds the right
``deepspeed`` command line (against a stand-in ``deepspeed`` on PATH); the hostfile parses with
DeepSpeed's own parser. ``docker compose config`` runs only where a Compose v2 CLI exists.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yaml"
K8S_DIR = DEPLOY / "k8s"
DS_DIR = DEPLOY / "deepspeed"

TRAINING_STAGES = ("preliminary_model", "retrained_model", "refined_model", "finetuned_model")

# Value names of the official Dagster chart (helm/dagster/schema/schema/charts/... in
# dagster-io/dagster, which generates the chart's values.schema.json).
CHART_TOP_LEVEL = {
    "global", "dagsterWebserver", "dagster-user-deployments", "postgresql",
    "generatePostgresqlPasswordSecret", "generateCeleryConfigSecret", "rabbitmq", "redis", "flower",
    "ingress", "imagePullSecrets", "computeLogManager", "scheduler", "runLauncher", "pythonLogs",
    "dagsterDaemon", "busybox", "migrate", "telemetry", "serviceAccount", "retention",
    "additionalInstanceConfig", "nameOverride", "fullnameOverride", "rbacEnabled",
}
CHART_USER_DEPLOYMENT = {
    "name", "image", "dagsterApiGrpcArgs", "codeServerArgs", "includeConfigInLaunchedRuns", "port",
    "env", "envConfigMaps", "envSecrets", "annotations", "nodeSelector", "affinity", "tolerations",
    "podSecurityContext", "securityContext", "resources", "livenessProbe", "readinessProbe",
    "startupProbe", "labels", "volumeMounts", "volumes", "schedulerName",
}
CHART_K8S_RUN_LAUNCHER = {
    "image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig", "kubeconfigFile",
    "envConfigMaps", "envSecrets", "envVars", "volumeMounts", "volumes", "labels",
    "failPodOnRunFailure", "resources", "schedulerName", "securityContext", "runK8sConfig",
}
CHART_RUN_K8S_CONFIG = {"containerConfig", "podSpecConfig", "podTemplateSpecMetadata",
                        "jobSpecConfig", "jobMetadata"}
CHART_POSTGRESQL = {"image", "enabled", "postgresqlHost", "postgresqlUsername", "postgresqlPassword",
                    "postgresqlDatabase", "postgresqlParams", "postgresqlScheme", "service"}
CHART_QUEUED_RUN_COORDINATOR = {"maxConcurrentRuns", "tagConcurrencyLimits", "dequeueIntervalSeconds",
                                "dequeueNumWorkers", "dequeueUseThreads"}
CHART_S3_COMPUTE_LOGS = {"bucket", "localDir", "prefix", "useSsl", "verify", "verifyCertPath",
                         "endpointUrl", "skipEmptyFiles", "uploadInterval", "uploadExtraArgs",
                         "showUrlOnly", "region"}
# Raw-config keys of a `dagster-k8s/config` tag / step_k8s_config (dagster_k8s K8sJobConfig).
DAGSTER_K8S_RAW_KEYS = {"container_config", "pod_spec_config", "pod_template_spec_metadata",
                        "job_spec_config", "job_metadata", "merge_behavior"}
K8S_EXECUTOR_KEYS = {"job_namespace", "load_incluster_config", "kubeconfig_file", "job_image",
                     "image_pull_policy", "image_pull_secrets", "service_account_name",
                     "env_config_maps", "env_secrets", "env_vars", "volume_mounts", "volumes",
                     "labels", "resources", "scheduler_name", "security_context",
                     "max_concurrent", "tag_concurrency_limits", "retries", "step_k8s_config",
                     "per_step_k8s_config", "job_wait_timeout", "k8s_api_retry_limit",
                     "k8s_api_retry_delay"}


def _load(path: Path):
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def helm_values() -> dict:
    return _load(K8S_DIR / "values.yaml")


@pytest.fixture(scope="module")
def k8s_executor() -> dict:
    return _load(K8S_DIR / "k8s-executor.yaml")


def _cmd(service: dict) -> list[str]:
    """A service command as a token list (shell-form commands are split on whitespace)."""
    cmd = service["command"]
    if isinstance(cmd, str):
        return cmd.split()
    tokens: list[str] = []
    for part in cmd:
        tokens.extend(str(part).split())
    return tokens


def _flag(tokens: list[str], flag: str) -> str:
    assert flag in tokens, f"{flag} missing from {tokens}"
    return tokens[tokens.index(flag) + 1]


# --------------------------------------------------------------------------- every YAML file

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def test_deploy_has_the_expected_yaml_files():
    names = {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES}
    assert {"compose/docker-compose.yaml", "compose/dagster.yaml", "compose/workspace.yaml",
            "k8s/values.yaml", "k8s/k8s-executor.yaml", "k8s/data-pvc.yaml"} <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert docs, f"{path} has no YAML document"
    assert all(isinstance(d, dict) for d in docs)


# --------------------------------------------------------------------------- compose

def test_compose_has_required_services(services):
    assert {"postgres", "minio", "minio-init", "mlflow", "ramflow-code", "dagster-webserver",
            "dagster-daemon", "model-server"} <= set(services)
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"


def test_compose_mlflow_server(services):
    svc = services["mlflow"]
    tokens = _cmd(svc)
    assert tokens[tokens.index("mlflow") + 1] == "server"
    assert "--serve-artifacts" in tokens
    assert _flag(tokens, "--host") == "0.0.0.0"
    env = svc["environment"]
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # the backend URI (with the DB password) comes from the env var mlflow server reads
    assert "--backend-store-uri" not in tokens
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql")
    assert "@postgres:5432/" in env["MLFLOW_BACKEND_STORE_URI"]
    assert _flag(tokens, "--artifacts-destination").startswith("s3://")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    assert svc["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_artifact_bucket_is_created(services):
    init = " ".join(_cmd(services["minio-init"]))
    assert 'mc mb --ignore-existing "local/$${MLFLOW_ARTIFACT_BUCKET}"' in init
    bucket_default = re.search(r"\$\{MLFLOW_ARTIFACT_BUCKET:-([^}]+)\}",
                               _flag(_cmd(services["mlflow"]), "--artifacts-destination"))
    assert bucket_default and services["minio-init"]["environment"]["MLFLOW_ARTIFACT_BUCKET"] == (
        "${MLFLOW_ARTIFACT_BUCKET:-%s}" % bucket_default.group(1))


def test_compose_code_location_serves_definitions_with_gpus(services):
    svc = services["ramflow-code"]
    tokens = _cmd(svc)
    assert tokens[:3] == ["dagster", "code-server", "start"]
    assert _flag(tokens, "-m") == "orchestration.definitions"
    assert _flag(tokens, "-a") == "defs"
    assert _flag(tokens, "-h") == "0.0.0.0"
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    env = svc["environment"]
    assert env["MLFLOW_TRACKING_URI"] == env["RAMFLOW_MLFLOW_URI"] == "http://mlflow:5000"
    assert env["RAMFLOW_DATA_ROOT"] == "/opt/ramflow/data"
    assert any(v.endswith(":/opt/ramflow/data") for v in svc["volumes"])
    assert "shm_size" in svc
    health = svc["healthcheck"]["test"]
    assert health[1:4] == ["dagster", "api", "grpc-health-check"]


def test_compose_workspace_points_at_the_code_location(services):
    workspace = _load(COMPOSE_DIR / "workspace.yaml")
    (entry,) = workspace["load_from"]
    grpc = entry["grpc_server"]
    assert grpc["host"] in services
    assert str(grpc["port"]) == _flag(_cmd(services[grpc["host"]]), "-p")


@pytest.mark.parametrize("name,binary", [("dagster-webserver", "dagster-webserver"),
                                         ("dagster-daemon", "dagster-daemon")])
def test_compose_dagster_services_share_instance_and_workspace(services, name, binary):
    svc = services[name]
    tokens = _cmd(svc)
    assert tokens[0] == binary
    assert _flag(tokens, "-w") == "/opt/dagster/workspace.yaml"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    assert mounts["/opt/dagster/dagster_home/dagster.yaml"] == "./dagster.yaml"
    assert mounts["/opt/dagster/workspace.yaml"] == "./workspace.yaml"
    env = svc["environment"]
    assert env["DAGSTER_HOME"] == "/opt/dagster/dagster_home"
    for var in ("DAGSTER_POSTGRES_HOST", "DAGSTER_POSTGRES_USER", "DAGSTER_POSTGRES_PASSWORD",
                "DAGSTER_POSTGRES_DB"):
        assert var in env
    # the code location reads the same instance (it executes the runs)
    code_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["ramflow-code"]["volumes"]}
    assert code_mounts["/opt/dagster/dagster_home/dagster.yaml"] == "./dagster.yaml"
    assert code_mounts["/opt/dagster/compute_logs"] == mounts["/opt/dagster/compute_logs"]


def test_compose_model_server(services):
    svc = services["model-server"]
    tokens = _cmd(svc)
    assert tokens[:3] == ["mlflow", "models", "serve"]
    assert _flag(tokens, "-m") == "models:/ram-tagger@champion"
    assert _flag(tokens, "--env-manager") == "local"
    assert _flag(tokens, "-h") == "0.0.0.0"
    port = _flag(tokens, "-p")
    assert any(str(p).endswith(f":{port}") for p in svc["ports"])
    assert f"localhost:{port}/ping" in " ".join(svc["healthcheck"]["test"])
    assert svc["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_compose_bind_mounts_and_build_exist(compose, services):
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (COMPOSE_DIR / src).exists(), f"{name}: {src} missing"
            else:
                assert src in compose["volumes"], f"{name}: undeclared volume {src}"
        if "build" in svc:
            context = (COMPOSE_DIR / svc["build"]["context"]).resolve()
            assert context == REPO
            assert (context / svc["build"]["dockerfile"]).is_file()


def test_compose_variables_are_documented_in_env_example():
    used = set(re.findall(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)", COMPOSE_FILE.read_text(encoding="utf-8")))
    documented = set()
    for line in (COMPOSE_DIR / ".env.example").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Z_][A-Z0-9_]*)=", line)
        if m:
            documented.add(m.group(1))
    optional_images = {"MINIO_IMAGE", "MINIO_MC_IMAGE"}  # documented in the compose file
    assert used - documented - optional_images == set()
    # every variable compose refuses to run without has a value in the example
    required = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):\?", COMPOSE_FILE.read_text(encoding="utf-8")))
    assert required and required <= documented


def test_initdb_script_is_valid_bash():
    script = COMPOSE_DIR / "initdb" / "10-create-mlflow-db.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert os.access(script, os.X_OK)


def test_dockerfile_copies_existing_sources():
    text = (COMPOSE_DIR / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM ", text, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = line.split()
        matched = [s for s in sources if list(REPO.glob(s.rstrip("/")))]
        assert matched, f"COPY {line}: no source exists in the build context"
    for pkg in ("ramflow_io", "data_engine", "ram_model", "engine_rounds", "orchestration"):
        assert f"COPY {pkg}/ {pkg}/" in text
    for extra in ("dagster-postgres", "dagster-k8s", "psycopg2-binary", "boto3"):
        assert extra in text


def _compose_cli() -> list[str] | None:
    """A Compose v2 CLI that answers `version`, or None."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cli in candidates:
        try:
            done = subprocess.run([*cli, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return cli
    return None


def test_docker_compose_config_renders(tmp_path):
    """`compose config` interpolates and validates offline (no engine needed) when a CLI exists."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose v2 CLI here (`docker compose version` fails)")
    done = subprocess.run(
        [*cli, "--project-directory", str(COMPOSE_DIR), "--env-file", str(COMPOSE_DIR / ".env.example"),
         "-f", str(COMPOSE_FILE), "--profile", "serve", "config", "--format", "json"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    import json

    rendered = json.loads(done.stdout)
    assert rendered["services"]["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "model-server" in rendered["services"]


# --------------------------------------------------------------------------- Dagster instance

@pytest.fixture()
def instance_env(monkeypatch):
    for var, value in {"DAGSTER_POSTGRES_HOST": "postgres", "DAGSTER_POSTGRES_USER": "u",
                       "DAGSTER_POSTGRES_PASSWORD": "p", "DAGSTER_POSTGRES_DB": "dagster"}.items():
        monkeypatch.setenv(var, value)


def test_dagster_yaml_passes_dagster_instance_schema(instance_env):
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config
    from dagster._serdes.config_class import ConfigurableClass

    config, custom_cls = dagster_instance_config(str(COMPOSE_DIR), "dagster.yaml")
    assert custom_cls is None
    assert set(config["storage"]) == {"postgres"}
    assert config["run_launcher"]["class"] == "DefaultRunLauncher"
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    # every configured class imports and accepts its config
    for key in ("run_launcher", "run_coordinator", "compute_logs"):
        entry = config[key]
        cls = getattr(importlib.import_module(entry["module"]), entry["class"])
        assert issubclass(cls, ConfigurableClass)
        result = process_config(cls.config_type(), entry.get("config") or {})
        assert result.success, (key, result.errors)


def test_workspace_yaml_passes_dagster_workspace_schema():
    from dagster._core.workspace.config_schema import ensure_workspace_config

    path = COMPOSE_DIR / "workspace.yaml"
    validated = ensure_workspace_config(_load(path), str(path))
    assert validated["load_from"][0]["grpc_server"]["location_name"] == "ramflow"


# --------------------------------------------------------------------------- Helm values

def test_helm_values_use_chart_value_names(helm_values):
    assert set(helm_values) <= CHART_TOP_LEVEL, set(helm_values) - CHART_TOP_LEVEL
    assert set(helm_values["postgresql"]) <= CHART_POSTGRESQL
    queued = helm_values["dagsterDaemon"]["runCoordinator"]
    assert queued["type"] == "QueuedRunCoordinator"
    assert set(queued["config"]["queuedRunCoordinator"]) <= CHART_QUEUED_RUN_COORDINATOR
    logs = helm_values["computeLogManager"]
    assert logs["type"] == "S3ComputeLogManager"
    assert set(logs["config"]["s3ComputeLogManager"]) <= CHART_S3_COMPUTE_LOGS


def test_helm_values_k8s_run_launcher(helm_values):
    launcher = helm_values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    cfg = launcher["config"]["k8sRunLauncher"]
    assert set(cfg) <= CHART_K8S_RUN_LAUNCHER, set(cfg) - CHART_K8S_RUN_LAUNCHER
    assert set(cfg["runK8sConfig"]) <= CHART_RUN_K8S_CONFIG
    assert cfg["runK8sConfig"]["jobSpecConfig"]["backoffLimit"] == 0


def test_helm_values_user_deployment(helm_values):
    user = helm_values["dagster-user-deployments"]
    assert user["enabled"] is True
    (dep,) = user["deployments"]
    assert set(dep) <= CHART_USER_DEPLOYMENT, set(dep) - CHART_USER_DEPLOYMENT
    assert dep["image"]["repository"].endswith("/ramflow")
    args = dep["codeServerArgs"]
    assert args[args.index("--module-name") + 1] == "orchestration.definitions"
    assert args[args.index("--attribute") + 1] == "defs"
    assert dep["includeConfigInLaunchedRuns"]["enabled"] is True
    env = {e["name"]: e["value"] for e in dep["env"]}
    assert env["RAMFLOW_LAUNCHER"] == "deepspeed"
    assert env["RAMFLOW_MLFLOW_URI"].startswith("http")
    # the data volume mounted at RAMFLOW_DATA_ROOT is the RWX claim of data-pvc.yaml
    (mount,) = dep["volumeMounts"]
    assert mount["mountPath"] == env["RAMFLOW_DATA_ROOT"]
    (volume,) = [v for v in dep["volumes"] if v["name"] == mount["name"]]
    (pvc,) = list(yaml.safe_load_all((K8S_DIR / "data-pvc.yaml").read_text(encoding="utf-8")))
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    # secrets referenced by the code location are also given to run pods
    run_secrets = helm_values["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"]
    assert dep["envSecrets"] == run_secrets


def test_gpu_training_step_k8s_config(k8s_executor):
    gpu = k8s_executor["gpu_training_step"]
    assert set(gpu) <= DAGSTER_K8S_RAW_KEYS
    resources = gpu["container_config"]["resources"]
    n_gpus = resources["limits"]["nvidia.com/gpu"]
    assert int(n_gpus) > 0 and resources["requests"]["nvidia.com/gpu"] == n_gpus
    pod = gpu["pod_spec_config"]
    assert pod["node_selector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # /dev/shm mount is backed by a memory volume of the same name
    (shm,) = [m for m in gpu["container_config"]["volume_mounts"] if m["mount_path"] == "/dev/shm"]
    (vol,) = [v for v in pod["volumes"] if v["name"] == shm["name"]]
    assert vol["empty_dir"]["medium"] == "Memory"


def test_k8s_executor_run_config_targets_training_steps(k8s_executor):
    from orchestration.pipeline import STAGE_NAMES
    from orchestration.resources import TrainingLauncher

    run_config = k8s_executor["run_config"]
    executor = run_config["execution"]["config"]
    assert set(executor) <= K8S_EXECUTOR_KEYS
    assert set(executor["step_k8s_config"]) <= DAGSTER_K8S_RAW_KEYS
    per_step = executor["per_step_k8s_config"]
    assert set(per_step) == set(TRAINING_STAGES) and set(per_step) <= set(STAGE_NAMES)
    for stage in TRAINING_STAGES:
        assert per_step[stage] == k8s_executor["gpu_training_step"]
    launcher = run_config["resources"]["launcher"]["config"]
    assert set(launcher) <= set(TrainingLauncher.model_fields)
    TrainingLauncher(**launcher)  # valid values for the resource
    n_gpus = int(k8s_executor["gpu_training_step"]["container_config"]["resources"]["limits"]["nvidia.com/gpu"])
    assert launcher["mode"] == "deepspeed" and launcher["nproc"] == n_gpus


# --------------------------------------------------------------------------- DeepSpeed

HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


def _hostfile_hosts(path: Path) -> dict[str, int]:
    hosts: dict[str, int] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = HOST_LINE.match(line)
        assert m, f"bad hostfile line: {line!r}"
        assert m.group(1) not in hosts, f"duplicate host {m.group(1)}"
        hosts[m.group(1)] = int(m.group(2))
    return hosts


def test_hostfile_example_format():
    hosts = _hostfile_hosts(DS_DIR / "hostfile.example")
    assert len(hosts) >= 2 and all(slots > 0 for slots in hosts.values())


@pytest.mark.slow  # importing deepspeed imports torch (~20 s on 2 cores)
def test_hostfile_example_parses_with_deepspeed():
    runner = pytest.importorskip("deepspeed.launcher.runner")
    pool = runner.fetch_hostfile(str(DS_DIR / "hostfile.example"))
    assert dict(pool) == _hostfile_hosts(DS_DIR / "hostfile.example")


def test_launch_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(DS_DIR / "launch.sh")], check=True)
    assert os.access(DS_DIR / "launch.sh", os.X_OK)


@pytest.fixture()
def fake_deepspeed(tmp_path) -> Path:
    """A `deepspeed` stand-in that records its arguments and the forwarded-env file."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "deepspeed"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "$@" > "{tmp_path}/args"\n'
        f'cp "$DS_ENV_FILE" "{tmp_path}/ds_env"\n'
        f'pwd > "{tmp_path}/cwd"\n'
        f'env | grep -E "^(NCCL_|TORCH_NCCL_)" | sort > "{tmp_path}/nccl"\n',
        encoding="utf-8",
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return bindir


def _run_launch(bindir: Path, extra_env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "AWS_", "STAGE", "NUM_"))}
    env.pop("MASTER_ADDR", None)
    env.pop("HOSTFILE", None)
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    env.update(extra_env)
    return subprocess.run(["bash", str(DS_DIR / "launch.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_launch_script_builds_deepspeed_command(tmp_path, fake_deepspeed):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\n\nnode-a slots=4\nnode-b slots=4\n", encoding="utf-8")
    done = _run_launch(fake_deepspeed, {"HOSTFILE": str(hostfile), "NUM_GPUS": "4",
                                        "AWS_ACCESS_KEY_ID": "key-id", "NCCL_SOCKET_IFNAME": "ib0"},
                       "--max_steps", "10")
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text(encoding="utf-8").splitlines()
    assert _flag(args, "--hostfile") == str(hostfile)
    assert _flag(args, "--num_gpus") == "4"
    assert _flag(args, "--master_addr") == "node-a"  # first host of the hostfile
    assert "--num_nodes" not in args
    module_at = args.index("--module")
    assert args[module_at:] == ["--module", "--no_local_rank", "ram_model.train_stage",
                                "--stage", "retrained_model", "--max_steps", "10"]
    assert (tmp_path / "cwd").read_text(encoding="utf-8").strip() == str(REPO)
    forwarded = (tmp_path / "ds_env").read_text(encoding="utf-8").splitlines()
    assert "HF_HUB_OFFLINE=1" in forwarded and "AWS_ACCESS_KEY_ID=key-id" in forwarded
    assert not any(line.startswith("AWS_SECRET_ACCESS_KEY=") for line in forwarded)  # unset: not written
    nccl = dict(line.split("=", 1) for line in (tmp_path / "nccl").read_text(encoding="utf-8").splitlines())
    assert nccl["NCCL_SOCKET_IFNAME"] == "ib0"  # caller's value wins over the default
    assert nccl["NCCL_DEBUG"] == "WARN" and nccl["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_launch_script_stage_and_nodes(tmp_path, fake_deepspeed):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\nnode-c slots=8\n", encoding="utf-8")
    done = _run_launch(fake_deepspeed, {"HOSTFILE": str(hostfile), "STAGE": "finetuned_model",
                                        "NUM_NODES": "2", "MASTER_ADDR": "10.0.0.5"})
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text(encoding="utf-8").splitlines()
    assert _flag(args, "--num_nodes") == "2"
    assert _flag(args, "--master_addr") == "10.0.0.5"
    assert _flag(args, "--num_gpus") == "8"
    assert _flag(args, "--stage") == "finetuned_model"


def test_launch_script_rejects_missing_or_empty_hostfile(tmp_path, fake_deepspeed):
    done = _run_launch(fake_deepspeed, {"HOSTFILE": str(tmp_path / "absent")})
    assert done.returncode == 2 and "not found" in done.stderr
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    done = _run_launch(fake_deepspeed, {"HOSTFILE": str(empty)})
    assert done.returncode == 2 and "lists no hosts" in done.stderr
    assert not (tmp_path / "args").exists()  # deepspeed never started


# --------------------------------------------------------------------------- docs

def test_dvc_readme_documents_s3_remote():
    text = (DEPLOY / "dvc" / "README.md").read_text(encoding="utf-8")
    for snippet in ("dvc remote add -d s3 s3://", "dvc remote modify s3 endpointurl",
                    "AWS_ACCESS_KEY_ID", "dvc push", "dvc pull", "--local"):
        assert snippet in text


def test_readmes_reference_files_that_exist():
    """Paths under deploy/ named in the READMEs exist (docs do not drift from the tree)."""
    for readme in (DEPLOY / "README.md", K8S_DIR / "README.md"):
        text = readme.read_text(encoding="utf-8")
        for ref in set(re.findall(r"deploy/[\w./-]+\.(?:yaml|sh|md|example)", text)):
            assert (REPO / ref).exists(), f"{readme.name} names missing {ref}"


def test_deploy_params_train_with_deepspeed_and_agree_with_the_launcher(tmp_path, compose, helm_values):
    """The image's params.deepspeed.yaml (written by the Dockerfile's own command from
    params.yaml) validates, puts every training section on DeepSpeed and changes nothing else;
    compose and Helm point RAMFLOW_PARAMS at it and ask the launcher for the same backend."""
    from orchestration.settings import validate_params

    run = next(line for line in (COMPOSE_DIR / "Dockerfile").read_text().splitlines()
               if line.startswith("RUN ") and "params.deepspeed.yaml" in line)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    subprocess.run(["sh", "-c", run[len("RUN "):]], cwd=tmp_path, check=True)
    configs = validate_params(tmp_path / "params.deepspeed.yaml")
    shipped = validate_params(REPO / "params.yaml")
    assert {s: configs[s].backend for s in TRAINING_STAGES} == dict.fromkeys(TRAINING_STAGES, "deepspeed")
    for section, cfg in configs.items():
        expected = shipped[section].model_dump()
        if section in TRAINING_STAGES:
            expected["backend"] = "deepspeed"
        assert cfg.model_dump() == expected, section

    env = compose["x-dagster-env"]
    assert env["RAMFLOW_PARAMS"].endswith("/opt/ramflow/params.deepspeed.yaml}")
    assert env["RAMFLOW_LAUNCHER"].endswith("deepspeed}")
    pod_env = {e["name"]: e["value"] for e in _find_env_lists(helm_values) for e in e}
    assert pod_env["RAMFLOW_PARAMS"] == "/opt/ramflow/params.deepspeed.yaml"
    assert pod_env["RAMFLOW_LAUNCHER"] == "deepspeed"


def _find_env_lists(node) -> list[list[dict]]:
    """Every ``env:`` list of ``{name, value}`` items anywhere in a Helm values tree."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list) and all(isinstance(e, dict) and "name" in e for e in value):
                found.append([e for e in value if "value" in e])
            else:
                found.extend(_find_env_lists(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(_find_env_lists(item))
    return found
