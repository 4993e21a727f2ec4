"""The package boundary and the shared tables the program half is built on."""

import os
import pathlib
import subprocess
import sys

import pytest

from defjax import methods
from defjax.experiments import sweep
from defjax.training import runfiles

REPO = pathlib.Path(__file__).resolve().parents[1]
# What `pip install 'defjax[train]'` adds; the library must not need any
# (absl-py comes with optax itself).
PROGRAM_ONLY = (
    'orbax',
    'grain',
    'tensorflow_datasets',
    'ml_collections',
    'PIL',
    'tqdm',
    'matplotlib',
)


def test_library_imports_no_program_dependency():
  """`import defjax` and its library modules load none of the [train] extra
  (nor do the models, which the library's examples use)."""
  code = (
      'import sys, defjax, defjax.compress, defjax.feedback, defjax.wire,'
      ' defjax.methods, defjax.layouts, defjax.xla_cpu, defjax.training.models;'
      f' print(sorted(m for m in {PROGRAM_ONLY!r}'
      ' if any(k == m or k.startswith(m + ".") for k in sys.modules)))'
  )
  out = subprocess.run(
      [sys.executable, '-c', code],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      check=True,
  ).stdout
  assert out.strip() == '[]'


def test_method_table():
  """One row per method in the paper's column order, then EF21-SGDM and EF21;
  the lam and momentum each runs with, and the transform that runs it."""
  assert methods.LABELS == (
      'SGD',
      'EF',
      'SAEF',
      'PSync',
      'DEF',
      'DEF-A',
      'EF21-SGDM',
      'EF21',
  )
  assert [m.name for m in methods.TABLE if not m.compresses] == ['sgd']
  assert methods.LAM_NAMES == ('def', 'def_a')
  assert {m.name: methods.resolved_lam(m.name, 0.6) for m in methods.TABLE} == {
      'sgd': 0.6,
      'ef': 0.0,
      'saef': 1.0,
      'psync': 1.0,
      'def': 0.6,
      'def_a': 0.6,
      'ef21_sgdm': 0.0,
      'ef21': 0.0,
  }
  assert {
      m.name: methods.resolved_momentum(m.name, 0.9)
      for m in methods.TABLE
      if m.momentum is not None
  } == {'ef21': 0.0}
  assert methods.resolved_momentum('ef21_sgdm', 0.9) == 0.9
  assert {
      m.name: m.transform
      for m in methods.TABLE
      if m.transform != 'error_feedback'
  } == {'psync': 'psync', 'ef21_sgdm': 'ef21', 'ef21': 'ef21'}
  assert [(m.label, m.x_label) for m in methods.TABLE if m.x_label] == [
      ('DEF', 'DEF-A')
  ]
  with pytest.raises(
      ValueError, match='unknown method .adam.; choose one of sgd'
  ):
    methods.get('adam')


def test_sweep_launches_the_package_entry_point(tmp_path):
  (run,) = sweep.expand_grid(
      config='configs/fashion_mnist.py',
      out=tmp_path,
      methods=['sgd'],
      ratios=[1],
      seeds=[0],
  )
  assert run.command[:3] == [sys.executable, '-m', 'defjax.main']
  assert run.command[3:5] == [
      '--config',
      str(pathlib.Path('configs/fashion_mnist.py').resolve()),
  ]


def test_run_files_round_trip(tmp_path):
  """Records in step order, a cut-off line skipped, later records after a
  resume win, truncation drops what the checkpoint does not hold."""
  for step in (3, 6, 9):
    runfiles.append_metrics(
        tmp_path, {'step': step, 'test_accuracy': step / 10}
    )
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


def _exec_calls(monkeypatch, env, find=lambda name: f'lib{name}.so.4'):
  """restart_with_tcmalloc's os.execve calls under ``env`` (nothing is executed)."""
  from defjax.training import main

  calls = []
  monkeypatch.setattr(main.os, 'execve', lambda *a: calls.append(a))
  monkeypatch.setattr(main.ctypes.util, 'find_library', find)
  for k in ('LD_PRELOAD', main.ALLOCATOR_ENV, main.RESTARTED_ENV):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  main.restart_with_tcmalloc()
  return calls


@pytest.mark.skipif(
    not sys.platform.startswith('linux'), reason='LD_PRELOAD is Linux only'
)
def test_restart_with_tcmalloc_preloads_it_once(monkeypatch):
  [(path, argv, env)] = _exec_calls(monkeypatch, {})
  assert path == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
  assert env['LD_PRELOAD'] == 'libtcmalloc_minimal.so.4'
  # The restarted process goes on, even if the loader dropped LD_PRELOAD;
  # so does one whose user preloads anything, or asks for the system's malloc.
  assert (
      _exec_calls(
          monkeypatch, {'DEFJAX_RESTARTED_WITH': env['DEFJAX_RESTARTED_WITH']}
      )
      == []
  )
  assert _exec_calls(monkeypatch, {'LD_PRELOAD': 'libasan.so.8'}) == []
  assert _exec_calls(monkeypatch, {'DEFJAX_ALLOCATOR': 'system'}) == []
  assert _exec_calls(monkeypatch, {}, find=lambda name: None) == []


def test_restart_with_tcmalloc_really_loads_it():
  """Where tcmalloc is installed (make install adds it), the restarted
  process has it mapped and runs the same command line."""
  from defjax.training import main

  if not (sys.platform.startswith('linux') and main.tcmalloc_library()):
    pytest.skip('tcmalloc is not installed')
  code = (
      'from defjax.training import main; main.restart_with_tcmalloc();'
      ' print("tcmalloc" in open("/proc/self/maps").read())'
  )
  env = {
      k: v
      for k, v in os.environ.items()
      if k not in ('LD_PRELOAD', 'DEFJAX_ALLOCATOR', 'DEFJAX_RESTARTED_WITH')
  }
  out = subprocess.run(
      [sys.executable, '-c', code],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      check=True,
      env=env,
  ).stdout
  assert out.strip() == 'True'
