import subprocess
import sys

from tests.conftest import CONFIGS, DATA, REPO


def test_trainer_core_imports_and_trains_without_ray(tmp_path):
    """In a fresh interpreter where `import ray` fails, every trainer_core module imports and a fold trains (two steps
    of the tiny smoke model) and writes its files; Ray is never imported on the way, not even lazily."""
    code = (
        "import sys, pkgutil, importlib, importlib.util, pathlib\n"
        "sys.modules['ray'] = None  # any 'import ray' now raises ImportError\n"
        "import trainer_core\n"
        "mods = [m.name for m in pkgutil.walk_packages(trainer_core.__path__, 'trainer_core.')]\n"
        "if importlib.util.find_spec('triton') is None:  # the Triton kernels' module needs Triton (CUDA machines)\n"
        "    mods.remove('trainer_core.fastpath.softcap_triton')\n"
        "for m in mods: importlib.import_module(m)\n"
        "assert 'trainer_core.fold.loop' in mods and 'trainer_core.config' in mods, mods\n"
        "from trainer_core.config import load_config\n"
        "from trainer_core.data.arena import assign_folds, load_rows\n"
        "from trainer_core.fold.loop import train_fold\n"
        f"cfg = load_config({str(CONFIGS / 'smoke.yaml')!r}, ['data.max_length=64', 'train.max_steps=2'])\n"
        f"rows = assign_folds(load_rows({str(DATA)!r}, max_rows=40), 5)\n"
        f"out = pathlib.Path({str(tmp_path / 'fold=0')!r})\n"
        "result = train_fold(cfg, 0, rows, out)\n"
        "assert result.metrics.steps == 2 and (out / 'metrics.json').exists() and (out / 'oof.parquet').exists()\n"
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
