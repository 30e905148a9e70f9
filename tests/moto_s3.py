"""moto's S3 server on loopback for tests that keep a release in a bucket."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def moto_s3() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 with its dummy credentials in the environment;
    yields the endpoint URL. s3fs instances cached for an earlier endpoint are dropped."""
    from moto.server import ThreadedMotoServer
    from s3fs import S3FileSystem

    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL")
    saved = {k: os.environ.get(k) for k in keys}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    S3FileSystem.clear_instance_cache()
    try:
        yield endpoint
    finally:
        S3FileSystem.clear_instance_cache()
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
