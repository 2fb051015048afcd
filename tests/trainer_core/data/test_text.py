"""trainer_core/data/text.py is copied into every export and runs there without the project: it may import only the
standard library, numpy and pandas (the export test runs it where the project cannot be imported; this says why at
once)."""

import ast
import sys
from pathlib import Path

import numpy as np

from trainer_core.data import text


def test_text_imports_only_the_standard_library_numpy_and_pandas():
    tree = ast.parse(Path(text.__file__).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level], "a relative import"
    assert roots - set(sys.stdlib_module_names) <= {"numpy", "pandas"}


def test_pad_rows_pads_right_and_lays_pairs_side_by_side():
    ids, mask = text.pad_rows([([5, 6, 7], [8]), ([9], [10, 11])], pad_id=0)
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 0, 0], [10, 11, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0]]
    ids, mask = text.pad_rows([[1, 2], [3]], pad_id=4)
    assert ids.tolist() == [[1, 2], [3, 4]] and mask.tolist() == [[1, 1], [1, 0]]
