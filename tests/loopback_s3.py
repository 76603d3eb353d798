"""A real S3-compatible server on loopback: moto in server mode, in its own process, with authentication.

The first three requests (create an IAM user, its access key, its policy) run unauthenticated; from then
on the server checks every request's signature against that key, so a wrong secret or an unknown key id
is refused as a real S3 endpoint refuses it. Clients find the server through the AWS SDK's own
variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`): nothing in params.yaml.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REGION = "us-east-1"
_SETUP_REQUESTS = 3  # create_user, create_access_key, put_user_policy
_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackS3:
    """One moto server process and the credentials of its only user."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = log.open("wb")
        # no profile or shared file may supply other credentials: both point at an empty file
        self.empty_aws_config = log.with_name("aws-config-empty")
        self.empty_aws_config.write_text("")
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_REQUESTS)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_until_up()
        self.access_key_id, self.secret_access_key = self._create_user()

    def _wait_until_up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}; see {self._log.name}")
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"moto server did not answer on {self.url} within {timeout} s")

    def _create_user(self) -> tuple[str, str]:
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="dvc")
        key = iam.create_access_key(UserName="dvc")["AccessKey"]
        iam.put_user_policy(UserName="dvc", PolicyName="s3-all", PolicyDocument=json.dumps(_POLICY))
        return key["AccessKeyId"], key["SecretAccessKey"]

    def env(self, **changes: str) -> dict[str, str]:
        """The AWS SDK variables that point a client at this server (`changes` override some)."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": str(self.empty_aws_config),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.empty_aws_config),
            "AWS_EC2_METADATA_DISABLED": "true",
            **changes,
        }

    def client(self) -> Any:
        """A boto3 S3 client with the user's credentials."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object of a bucket: key -> bytes."""
        s3, out = self.client(), {}
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                out[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()
