import subprocess
import sys

from tests.conftest import REPO


def test_trainer_core_imports_and_trains_without_ray():
    """In a fresh interpreter where `import ray` fails, every trainer_core module imports."""
    code = (
        "import sys, pkgutil, importlib\n"
        "sys.modules['ray'] = None  # any 'import ray' now raises ImportError\n"
        "import trainer_core\n"
        "mods = [m.name for m in pkgutil.iter_modules(trainer_core.__path__)]\n"
        "for m in mods: importlib.import_module('trainer_core.' + m)\n"
        "assert 'fold' in mods and 'config' in mods, mods\n"
        "assert not any(k == 'ray' or k.startswith('ray.') for k, v in sys.modules.items() if v is not None)\n"
        "print('ok', len(mods))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")


def test_no_ray_import_in_trainer_core_source():
    for path in (REPO / "trainer_core").rglob("*.py"):
        text = path.read_text()
        assert "import ray" not in text and "from ray" not in text, path
