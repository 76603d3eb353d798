"""MLflow's artifact store on S3 (moto on loopback, signatures checked): the register stage uploads the
model there and the champion loads from it; a missing bucket, refused credentials and an unreachable
endpoint each fail with one line naming `register.artifact_location` and the store's own reason, leave
no version in the registry, and leak no secret. Credentials come only from the AWS_* variables."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import S3_BUCKET, Home, registry_versions
from loopback_s3 import LoopbackS3, free_port

pytestmark = pytest.mark.slow

WRONG_SECRET = "wrong-secret-for-the-loopback-s3"  # planted: no output may contain it
LOAD_CHAMPION = """\
import sys, mlflow
mlflow.set_registry_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/qa-lora@champion")
print(model.predict({"question": ["What does zip() return?"]})["answer"][0])
"""


@pytest.fixture(scope="module")
def registrations(journey: dict[str, Any], s3_server: LoopbackS3) -> dict[str, Any]:
    home: Home = journey["home"]
    root = home.root / "artifact-store"

    def register(name: str, location: str, env: dict[str, str]) -> dict[str, Any]:
        run = Path(shutil.copytree(journey["run"], root / name, ignore=shutil.ignore_patterns("register")))
        uri = f"sqlite:///{root / name}.db"
        sets = (f"register.tracking_uri={uri}", f"register.artifact_location={location}")
        return {"done": home.run("register", run, *sets, env=env), "run": run, "uri": uri}

    good = f"s3://{S3_BUCKET}/mlflow"
    out = {
        "ok": register("ok", good, s3_server.env()),
        "no_bucket": register("no-bucket", "s3://no-such-bucket/mlflow", s3_server.env()),
        "bad_key": register("bad-key", good, s3_server.env(AWS_SECRET_ACCESS_KEY=WRONG_SECRET)),
        "unreachable": register(
            "unreachable", good, s3_server.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")
        ),
    }
    for case in out.values():
        case["registry"] = registry_versions(home, case["uri"])
    out["objects"] = s3_server.objects(S3_BUCKET)
    out["load"] = subprocess.run(  # a downstream team: the champion from the registry, files from S3
        [sys.executable, "-c", LOAD_CHAMPION, out["ok"]["uri"]],
        env={**home.env, **s3_server.env()},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return out


def test_the_model_is_uploaded_to_the_bucket_and_registered_from_it(registrations: dict[str, Any]) -> None:
    ok = registrations["ok"]
    assert ok["done"].returncode == 0, ok["done"].stderr[-3000:]
    registration = json.loads((ok["run"] / "register" / "registration.json").read_text())
    assert registration["uris"]["source"].startswith(f"s3://{S3_BUCKET}/mlflow/"), registration
    (version,) = ok["registry"]["versions"]
    assert version["source"].startswith(f"s3://{S3_BUCKET}/mlflow/")
    assert ok["registry"]["aliases"].get("champion") == version["version"]
    keys = set(registrations["objects"])
    for part in ("MLmodel", "onnx/model.onnx", "adapter/adapter_config.json", "README.md"):
        assert any(k.startswith("mlflow/") and k.endswith(f"/artifacts/model/{part}") for k in keys), part
    load = registrations["load"]
    assert load.returncode == 0 and load.stdout.strip(), load.stderr[-3000:]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no_bucket", "NoSuchBucket"),
        ("bad_key", "SignatureDoesNotMatch"),
        ("unreachable", "Could not connect to the endpoint URL"),
    ],
)
def test_store_faults_are_one_line_and_register_nothing(
    registrations: dict[str, Any], s3_server: LoopbackS3, case: str, reason: str
) -> None:
    done = registrations[case]["done"]
    assert done.returncode == 2, done.stderr[-3000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("qa-lora: error:")]
    assert line.startswith("qa-lora: error: register.artifact_location='s3://"), line
    assert "the artifact store failed" in line and reason in line, line
    assert "Traceback" not in done.stderr
    for secret in (s3_server.secret_access_key, WRONG_SECRET):
        assert secret not in done.stdout + done.stderr
    state = registrations[case]["registry"]
    assert state["versions"] == [] and [r["status"] for r in state["runs"]] == ["FAILED"], state
    assert not (registrations[case]["run"] / "register").exists()
