"""The wheel holds every module of the source tree: an editable install (what the tests run on) sees
the folders directly, so a subpackage missing from setup.py would only break a user's `pip install`."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_module_of_the_source_tree(tmp_path):
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT)]
    built = subprocess.run([*command, "-w", str(tmp_path)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("lowbit-*.whl")
    in_wheel = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    # kernels/ installs as lowbit.kernels (setup.py's package_dir)
    in_tree = {
        f"{installed}/{path.relative_to(ROOT / folder).as_posix()}"
        for folder, installed in (("lowbit", "lowbit"), ("kernels", "lowbit/kernels"))
        for path in (ROOT / folder).rglob("*.py")
    }
    assert sorted(in_tree - in_wheel) == []
