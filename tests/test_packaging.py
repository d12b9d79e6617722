"""The wheel holds every module of the source tree: an editable install (what the tests run on) sees
the folders directly, so a subpackage missing from setup.py would only break a user's `pip install`."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_module_of_the_source_tree(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("lowbit-*.whl")
    in_wheel = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    # kernels/ installs as lowbit.kernels (setup.py's package_dir)
    in_tree = {f"lowbit/{p.relative_to(ROOT / 'lowbit').as_posix()}" for p in (ROOT / "lowbit").rglob("*.py")}
    in_tree |= {f"lowbit/kernels/{p.relative_to(ROOT / 'kernels').as_posix()}" for p in (ROOT / "kernels").rglob("*.py")}
    assert sorted(in_tree - in_wheel) == []
