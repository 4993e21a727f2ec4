"""The package boundary and the shared tables the program half is built on."""

import pathlib
import subprocess
import sys

import pytest

from defjax import methods
from defjax import runfiles
from defjax import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]
# What `pip install 'defjax[train]'` adds; the library must not need any
# (absl-py comes with optax itself).
PROGRAM_ONLY = ('orbax', 'grain', 'tensorflow_datasets', 'ml_collections', 'PIL', 'tqdm',
                'matplotlib')


def test_library_imports_no_program_dependency():
  """`import defjax` and its library modules load none of the [train] extra."""
  code = ('import sys, defjax, defjax.compress, defjax.feedback, defjax.parallel,'
          ' defjax.wire, defjax.methods, defjax.models, defjax.sharded;'
          f' print(sorted(m for m in {PROGRAM_ONLY!r}'
          ' if any(k == m or k.startswith(m + ".") for k in sys.modules)))')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                       text=True, timeout=300, check=True).stdout
  assert out.strip() == '[]'


def test_method_table():
  """One row per method in the paper's column order; the lam each runs with."""
  assert methods.LABELS == ('SGD', 'EF', 'SAEF', 'PSync', 'DEF', 'DEF-A')
  assert [m.name for m in methods.TABLE if not m.compresses] == ['sgd']
  assert methods.LAM_NAMES == ('def', 'def_a')
  assert {m.name: methods.resolved_lam(m.name, 0.6) for m in methods.TABLE} == {
      'sgd': 0.6, 'ef': 0.0, 'saef': 1.0, 'psync': 1.0, 'def': 0.6, 'def_a': 0.6}
  assert [(m.label, m.x_label) for m in methods.TABLE if m.x_label] == [('DEF', 'DEF-A')]
  with pytest.raises(ValueError, match='unknown method .adam.; choose one of sgd'):
    methods.get('adam')


def test_sweep_launches_the_package_entry_point(tmp_path):
  run, = sweep.expand_grid(config='configs/fashion_mnist.py', out=tmp_path,
                           methods=['sgd'], ratios=[1], seeds=[0])
  assert run.command[:3] == [sys.executable, '-m', 'defjax.main']
  assert run.command[3:5] == ['--config', str(pathlib.Path('configs/fashion_mnist.py').resolve())]


def test_run_files_round_trip(tmp_path):
  """Records in step order, a cut-off line skipped, later records after a
  resume win, truncation drops what the checkpoint does not hold."""
  for step in (3, 6, 9):
    runfiles.append_metrics(tmp_path, {'step': step, 'test_accuracy': step / 10})
  with open(tmp_path / runfiles.METRICS, 'a') as f:
    f.write('{"step": 12, "test_acc')  # a kill mid-write
  assert [r['step'] for r in runfiles.read_metrics(tmp_path)] == [3, 6, 9]
  assert runfiles.last_metrics(tmp_path)['step'] == 9
  runfiles.truncate_metrics(tmp_path, 6)
  assert [r['step'] for r in runfiles.read_metrics(tmp_path)] == [3, 6]
  runfiles.append_metrics(tmp_path, {'step': 6, 'test_accuracy': 0.7})
  assert runfiles.read_metrics(tmp_path)[-1]['test_accuracy'] == 0.7
  assert runfiles.finished_status(tmp_path) is None
  runfiles.write_summary(tmp_path, {'status': 'diverged'})
  assert runfiles.finished_status(tmp_path) == 'diverged'
  assert runfiles.STATUS_BY_EXIT[runfiles.EXIT_INTERRUPTED] == 'interrupted'
