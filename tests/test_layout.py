"""The package layout: old import paths still work for one release, with a DeprecationWarning."""

import importlib
import sys

import pytest

OLD_TO_NEW = {
    "lowbit.config": "lowbit.int8.config",
    "lowbit.ops": "lowbit.int8.ops",
    "lowbit.functional": "lowbit.int8.functional",
    "lowbit._compiled_ops": "lowbit.int8._compiled_ops",
    "lowbit.fp8_config": "lowbit.float8.config",
    "lowbit.fp8_ops": "lowbit.float8.ops",
    "lowbit.fp8_functional": "lowbit.float8.functional",
}


@pytest.mark.parametrize("old", list(OLD_TO_NEW))
def test_old_paths_warn_and_are_the_new_modules(old, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {OLD_TO_NEW[old]}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(OLD_TO_NEW[old])


def test_the_package_imports_no_old_path():
    import lowbit  # noqa: F401

    assert not any(name in sys.modules and sys.modules[name].__name__ == name for name in OLD_TO_NEW)


def test_the_repository_kernels_folder_never_shadows_a_kernels_package(tmp_path):
    """With the repository root on sys.path, `import kernels` finds another package, or none."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    probe = "import kernels; print(kernels.WHO)"
    alone = "import kernels; print(sorted(k for k in vars(kernels) if not k.startswith('__')))"
    missing = subprocess.run([sys.executable, "-c", alone], cwd=root, capture_output=True, text=True)
    assert missing.stdout.strip() == "[]", missing.stderr  # nothing to mistake for a kernels package
    other = tmp_path / "site" / "kernels"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("WHO = 'the other one'\n")
    env = {"PYTHONPATH": f"{root}{__import__('os').pathsep}{other.parent}"}
    found = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, env=env)
    assert found.stdout.strip() == "the other one", found.stderr


def test_transformers_imports_with_the_repository_root_on_sys_path():
    """transformers imports `kernels` to check for Hugging Face's package; ours must read as absent."""
    import subprocess
    from pathlib import Path

    pytest.importorskip("transformers")
    root = Path(__file__).resolve().parents[1]
    code = "from transformers.utils import is_kernels_available; print(is_kernels_available())"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("False"), done.stderr[-2000:]
