"""A team tracking server that lets only its members in: the `mlflow server` of docs/scaling.md with MLflow's
basic-auth app over HTTPS (a private CA), started from that page's own commands, and the pipeline
run against it with each kind of login."""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import requests

from pipeline.visualize import FIGURE_COUNT
from tests.doc_blocks import doc_block
from tests.processes import stop_process_group
from tests.projects import assert_kept, edit_params, make_project, outputs_of, project_env, run
from tests.servers import free_port
from tests.synthetic import write_mirror

pytestmark = pytest.mark.slow

PAGE = "scaling.md"  # its section "A team tracking server"
DOCS_ADDRESS = "mlflow.internal:5443"  # the server of docs/scaling.md; here localhost on a free port
EXPERIMENT = "vae-pipeline"  # the docs' admin creates it; the code's default experiment_name


@dataclasses.dataclass(frozen=True)
class TeamServer:
    url: str
    home: Path  # what the page's commands wrote: certificates, the accounts, the runs, the server's log
    ca: Path
    passwords: dict[str, str]  # admin, alice (EDIT), victor (READ)

    def login(self, user: str, password: str | None = None) -> dict[str, str]:
        """The environment a user runs the pipeline in: the login and the team's CA."""
        return {
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": password or self.passwords[user],
            "MLFLOW_TRACKING_SERVER_CERT_PATH": str(self.ca),
        }

    def api(self, endpoint: str, **body) -> dict:
        """A REST call as the admin."""
        response = requests.post(
            f"{self.url}/api/2.0/mlflow/{endpoint}",
            json=body,
            timeout=30,
            verify=self.ca,
            auth=("admin", self.passwords["admin"]),
        )
        response.raise_for_status()
        return response.json()

    def runs(self) -> list[dict]:
        experiment = requests.get(
            f"{self.url}/api/2.0/mlflow/experiments/get-by-name",
            timeout=30,
            verify=self.ca,
            params={"experiment_name": EXPERIMENT},
            auth=("admin", self.passwords["admin"]),
        )
        return self.api("runs/search", experiment_ids=[experiment.json()["experiment"]["experiment_id"]]).get(
            "runs", []
        )


def here(block: str, port: int) -> str:
    """A docs block as run here: the server on localhost, on a free port."""
    return block.replace(DOCS_ADDRESS, f"localhost:{port}").replace("--port 5443", f"--port {port}")


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl (Debian: apt install openssl)")
    certificates, serve, accounts = (
        doc_block(PAGE, f"team-server-{name}") for name in ("certificates", "start", "accounts")
    )
    home, port = tmp_path_factory.mktemp("team-server"), free_port()
    passwords = {user: f"{user}-{secrets.token_urlsafe(12)}" for user in ("admin", "alice", "victor")}
    run(["bash", "-euo", "pipefail", "-c", certificates], home)
    environment = project_env() | {
        "MLFLOW_AUTH_ADMIN_PASSWORD": passwords["admin"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{home}/runs.db",
    }
    with (home / "server.log").open("wb") as log:
        server = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", here(serve, port)],
            cwd=home,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url, ca = f"https://localhost:{port}", home / "tls/ca.pem"
        wait_for_health(url, ca, server, home / "server.log")
        run(
            ["bash", "-euo", "pipefail", "-c", here(accounts, port)],
            home,
            env=environment | {"ALICE_PASSWORD": passwords["alice"], "VICTOR_PASSWORD": passwords["victor"]},
        )
        yield TeamServer(url, home, ca, passwords)
    finally:
        stop_process_group(server)


def wait_for_health(url: str, ca: Path, server: subprocess.Popen, log: Path) -> None:
    """Until the server answers over HTTPS with the CA's certificate (it takes seconds to start)."""
    context = ssl.create_default_context(cafile=ca)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5, context=context):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the server of docs/scaling.md did not start:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def member_run(team_server, tmp_path_factory) -> tuple[Path, str]:
    """A project reproduced by alice, on the team (EDIT); what `dvc repro` printed."""
    tmp = tmp_path_factory.mktemp("member")
    project = make_project(tmp / "project", write_mirror(tmp / "mirror"), **{"mlflow.tracking_uri": team_server.url})
    result = run(["dvc", "repro"], project, env=project_env() | team_server.login("alice"))
    return project, result.stdout + result.stderr


def places_holding(secret: str, folders: list[Path]) -> list[str]:
    """Every file under `folders` that holds `secret`, and git's objects (compressed on disk) read
    unpacked: those a ref or reflog reaches, which `git push` and `dvc exp push` can send. (A failed
    `dvc exp run` leaves the workspace it stashed as unreachable objects, local until `git gc`.)"""
    found = []
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and secret.encode() in path.read_bytes():
                found.append(str(path.relative_to(folder)))
        if (folder / ".git").is_dir():
            listed = run(["git", "rev-list", "--objects", "--all", "--reflog"], folder).stdout
            objects = subprocess.run(
                ["git", "cat-file", "--batch"],
                cwd=folder,
                capture_output=True,
                check=True,
                input="".join(line.split()[0] + "\n" for line in listed.splitlines()).encode(),
            )
            if secret.encode() in objects.stdout:
                found.append("git objects")
    return found


def test_the_documented_server_refuses_an_anonymous_curl(team_server):
    anonymous_curl = doc_block(PAGE, "team-server-anonymous-curl")
    port = int(team_server.url.rsplit(":", 1)[1])
    answer = run(["bash", "-euo", "pipefail", "-c", here(anonymous_curl, port)], team_server.home).stdout
    assert "You are not authenticated" in answer and answer.splitlines()[-1] == "401", answer


def test_a_member_logs_a_complete_run_over_https_and_no_password_is_kept_anywhere(team_server, member_run):
    project, printed = member_run
    recorded = json.loads((project / "models/mlflow_run.json").read_text())["run_id"]
    [logged] = [r for r in team_server.runs() if r["info"]["run_id"] == recorded]
    assert logged["info"]["status"] == "FINISHED"
    assert logged["info"]["artifact_uri"].startswith("mlflow-artifacts:"), "artifacts went through the server"
    metrics = {m["key"] for m in logged["data"]["metrics"]}
    assert {"train_total", "val_total", "test_total", "test_knn_accuracy"} <= metrics
    run_id = logged["info"]["run_id"]
    figures = requests.get(
        f"{team_server.url}/api/2.0/mlflow/artifacts/list",
        verify=team_server.ca,
        timeout=30,
        params={"run_id": run_id, "path": "figures"},
        auth=("alice", team_server.passwords["alice"]),
    )
    assert len(figures.json()["files"]) == FIGURE_COUNT
    models = team_server.api("logged-models/search", experiment_ids=[logged["info"]["experiment_id"]])["models"]
    assert [m["info"]["source_run_id"] for m in models] == [run_id], "the trained model, logged"
    params = {p["key"]: p["value"] for p in logged["data"]["params"]}
    assert params["mlflow.tracking_uri"] == team_server.url

    for user, password in team_server.passwords.items():
        assert password not in printed, f"{user}'s password in what dvc repro printed"
        assert places_holding(password, [project, team_server.home]) == [], f"{user}'s password kept"


@pytest.mark.parametrize("login", ["anonymous", "wrong password", "read only", "without the CA"])
def test_a_login_that_may_not_log_runs_is_refused_before_training_in_one_line(team_server, member_run, tmp_path, login):
    project = Path(shutil.copytree(member_run[0], tmp_path / "project", symlinks=True))
    url = team_server.url
    environment, expected = {
        "anonymous": (
            {"MLFLOW_TRACKING_SERVER_CERT_PATH": str(team_server.ca)},
            f"error: the MLflow server {url} requires a login to log runs to experiment '{EXPERIMENT}': set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the "
            "environment",
        ),
        "wrong password": (
            team_server.login("alice", "not-alices-password"),
            f"error: the MLflow server {url} refused the login of user 'alice', so no run can be "
            f"logged to experiment '{EXPERIMENT}': check MLFLOW_TRACKING_PASSWORD",
        ),
        "read only": (
            team_server.login("victor"),
            f"error: user 'victor' may read MLflow experiment '{EXPERIMENT}' on {url} but not log runs to "
            "it: ask the server's admin for EDIT permission on it",
        ),
        "without the CA": (
            {k: v for k, v in team_server.login("alice").items() if k != "MLFLOW_TRACKING_SERVER_CERT_PATH"},
            f"error: cannot verify the certificate of the MLflow server {url}: set "
            "MLFLOW_TRACKING_SERVER_CERT_PATH to the certificate of the CA that signed it",
        ),
    }[login]
    edit_params(project, **{"train.learning_rate": 0.001})  # so that train reruns
    before, runs_before = outputs_of(project), team_server.runs()

    result = run(["dvc", "repro"], project, check=False, env=project_env() | environment)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), result.stderr
    assert "failed to run: python -m pipeline.train, exited with 2" in result.stderr
    assert "epoch 1/" not in result.stdout + result.stderr, "refused before training"
    assert_kept(project, before)
    assert not (project / "models/checkpoint.pt").exists()
    assert team_server.runs() == runs_before, "nothing written to the server"
    if "MLFLOW_TRACKING_PASSWORD" in environment:
        assert environment["MLFLOW_TRACKING_PASSWORD"] not in result.stdout + result.stderr


def test_a_password_in_the_tracking_uri_is_refused_before_any_stage_and_kept_nowhere_but_the_edit(
    team_server, member_run, tmp_path
):
    project = Path(shutil.copytree(member_run[0], tmp_path / "project", symlinks=True))
    password = team_server.passwords["alice"]
    with_password = team_server.url.replace("https://", f"https://alice:{password}@")
    before, runs_before = outputs_of(project), team_server.runs()

    result = run(["dvc", "exp", "run", "-S", f"mlflow.tracking_uri={with_password}"], project, check=False)
    assert result.returncode != 0
    assert (
        "error: mlflow.tracking_uri: must not hold a user or password, as params.yaml is committed and pushed "
        "with every experiment" in result.stderr
    )
    assert f"got '{team_server.url.replace('https://', 'https://***@')}'" in result.stderr
    assert "failed to reproduce 'check'" in result.stderr and "Running stage 'train'" not in result.stdout
    assert password not in result.stdout + result.stderr
    refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], project).stdout.split()
    assert [ref for ref in refs if not ref.startswith("refs/exps/exec/")] == [], "no experiment committed"
    assert places_holding(password, [project]) == ["params.yaml"], "only the workspace's edit, which -S wrote"
    assert_kept(project, before)
    assert team_server.runs() == runs_before
