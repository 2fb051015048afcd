"""A real S3-compatible server for tests: moto's server mode (``moto[server]``: Werkzeug serving moto's S3 over HTTP)
started in this process on a free local port, reached through the standard ``AWS_ENDPOINT_URL`` variable, with a
bucket made by boto3. Everything that talks to it - pyarrow in the orchestrator, Ray Train's checkpoint uploads, fold
workers in other processes and on other Ray nodes - goes over HTTP as it would to MinIO or AWS. No network beyond
127.0.0.1."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class S3:
    endpoint: str
    bucket: str
    env: dict  # what a process needs to reach it (set in this process's environment while the server runs)
    client: object  # boto3 S3 client

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def keys(self, prefix: str) -> list[str]:
        """Every object under ``prefix/`` (relative to it), by S3's own listing; the empty ``<folder>/`` markers that
        pyarrow's S3 filesystem keeps for folders are left out."""
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{prefix}/"):
            out += [o["Key"][len(prefix) + 1:] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
        return sorted(out)

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def checkpointed(self, prefix: str, fold: int) -> bool:
        """Whether Ray Train has registered a checkpoint of the run's fold in the bucket (listed in its snapshot)."""
        try:
            return "checkpoint_" in self.read(f"{prefix}/ray/fold={fold}/checkpoint_manager_snapshot.json").decode()
        except self.client.exceptions.NoSuchKey:
            return False


@contextlib.contextmanager
def s3_server(bucket: str = "runs") -> Iterator[S3]:
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=bucket)
        yield S3(endpoint, bucket, env, client)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
