"""`pip install .` into a fresh virtual environment gives `import fedpers` and no top-level common/client/server."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel and a virtual environment

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(out), str(REPO)], check=True, timeout=300)
    (path,) = out.glob("fedpers-*.whl")
    return path


def test_the_wheel_holds_one_fedpers_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fedpers"}
    for expected in ("fedpers/__init__.py", "fedpers/nn/trainer.py", "fedpers/client/agent.py",
                     "fedpers/server/app.py", "fedpers/rpc/federation_pb2.py", "fedpers/models/digits_cnn.ini"):
        assert expected in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "fedpers-client = fedpers.client.__main__:main" in text and "fedpers-sim = fedpers.client.sim:main" in text


def test_pip_install_into_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # the dependencies come from this test run's environment (no network); fedpers itself from the wheel
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = sysconfig.get_paths()["purelib"]
    Path(site, "deps-from-test-env.pth").write_text(deps + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
                   check=True, timeout=300)
    probe = (
        "import importlib.util, fedpers, fedpers.client.agent, fedpers.server.app\n"
        "from fedpers import models\n"
        "print(fedpers.__file__)\n"
        "print([m for m in ('common', 'client', 'server') if importlib.util.find_spec(m) is not None])\n"
        "print(models.path('digits_cnn').is_file())\n"
    )
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    location, tops, model = out.stdout.splitlines()
    assert location.startswith(site) and tops == "[]" and model == "True"
    cli = subprocess.run([str(env_dir / "bin" / "fedpers-server"), "--help"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert cli.returncode == 0 and "--metrics-listen" in cli.stdout
