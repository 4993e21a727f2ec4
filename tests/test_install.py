"""The install promise, the parts that need no fresh venv.

``make install-check`` (tests/install_check.py) builds and installs the wheel;
this checks in the suite what it relies on: the one-line exit 2 of the three
entry points and of the modules run by name (``python -m defjax.sweep``, ...,
``python -m defjax.training.main``) without the train extra (its modules made
unimportable here),
that line's module list against the extra and the program's imports, the
version's one source, and the install check's own README and closure logic.
"""

import ast
import importlib.metadata
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

import install_check
from defjax import main

REPO = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / 'pyproject.toml').read_text())
# What only `pip install 'defjax[train]'` brings: absl (with optax) and
# orbax-checkpoint (with flax) come with the core install too, so they stay.
TRAIN_ONLY = (
    'ml_collections',
    'orbax',
    'grain',
    'PIL',
    'tqdm',
    'tensorflow_datasets',
)
# Each entry point as its launcher runs it: the console script calls the
# pyproject target and exits with what it returns.
LAUNCH = {
    'defjax-train': (
        'import importlib, tomllib;'
        " target = tomllib.load(open('pyproject.toml', 'rb'))"
        "['project']['scripts']['defjax-train'];"
        " module, fn = target.split(':'); sys.argv = ['defjax-train'];"
        ' sys.exit(getattr(importlib.import_module(module), fn)())'
    ),
    'python -m defjax.main': (
        "import runpy; sys.argv = ['defjax.main'];"
        " runpy.run_module('defjax.main', run_name='__main__', alter_sys=True)"
    ),
    'train.py': (
        "import runpy; sys.argv = ['train.py'];"
        " runpy.run_path('train.py', run_name='__main__')"
    ),
}


def _without(modules, entry):
  """Runs ``entry`` in a fresh interpreter in which ``modules`` (and what is
  under them) cannot be imported, as if not installed."""
  hide = f'import sys; sys.modules.update(dict.fromkeys({modules!r}));'
  return subprocess.run(
      [sys.executable, '-c', hide + LAUNCH[entry]],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )


@pytest.mark.parametrize('entry', sorted(LAUNCH))
def test_entry_points_without_the_train_extra_answer_one_line(entry):
  proc = _without(TRAIN_ONLY, entry)
  assert (proc.returncode, proc.stdout, proc.stderr) == (
      2,
      '',
      "error: the training program needs pip install 'defjax[train]'"
      ' (not installed: ml_collections, orbax.checkpoint, grain, PIL, tqdm,'
      ' tensorflow_datasets)\n',
  )


@pytest.mark.parametrize('tool', ['sweep', 'report', 'gap', 'training.main'])
def test_modules_run_by_name_without_the_train_extra_answer_one_line(tool):
  hide = f'import sys; sys.modules.update(dict.fromkeys({TRAIN_ONLY!r}));'
  proc = subprocess.run(
      [
          sys.executable,
          '-c',
          hide + 'import runpy;'
          f" sys.argv = ['defjax.{tool}'];"
          f" runpy.run_module('defjax.{tool}', run_name='__main__', alter_sys=True)",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert (proc.returncode, proc.stdout) == (2, ''), proc.stderr
  assert proc.stderr == (
      f"error: python -m defjax.{tool} needs pip install 'defjax[train]'"
      ' (not installed: ml_collections, orbax.checkpoint, grain, PIL, tqdm,'
      ' tensorflow_datasets)\n'
  )


def test_the_line_names_only_what_is_missing():
  proc = _without(('tensorflow_datasets',), 'train.py')
  assert proc.returncode == 2
  assert proc.stderr.endswith('(not installed: tensorflow_datasets)\n')


def _imported_roots(paths) -> set[str]:
  roots = set()
  for path in paths:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        roots |= {alias.name.split('.')[0] for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and not node.level:
        roots.add(node.module.split('.')[0])
  return roots


def test_train_modules_are_the_programs_imports_from_the_train_extra():
  """The guard checks every module the program (and a config) imports beyond
  the library's dependencies, and each comes with the train extra."""
  program = [
      *(REPO / 'defjax' / 'training').rglob('*.py'),
      *(REPO / 'configs').glob('*.py'),
      REPO / 'train.py',
  ]
  imported = (
      _imported_roots(program)
      - set(sys.stdlib_module_names)
      - {'defjax', 'configs', *install_check.CORE}
  )
  guarded = {name.split('.')[0] for name in main.TRAIN_MODULES}
  assert imported <= guarded, f'not in TRAIN_MODULES: {imported - guarded}'

  extra = {
      re.match(r'[\w.-]+', r).group().lower().replace('_', '-')
      for r in PYPROJECT['project']['optional-dependencies']['train']
  }
  provided = importlib.metadata.packages_distributions()
  for root in guarded:
    dists = {d.lower().replace('_', '-') for d in provided.get(root, ())}
    assert dists & extra, f'{root} comes from {dists}, not the train extra'


def test_version_has_one_source():
  """pyproject reads defjax.__version__ as a literal (setuptools reads it
  without importing defjax, so without jax), and the changelog's newest
  version is it."""
  project = PYPROJECT['project']
  assert 'version' not in project and 'version' in project['dynamic']
  assert PYPROJECT['tool']['setuptools']['dynamic']['version'] == {
      'attr': 'defjax.__version__'
  }
  version = install_check._static_version()  # pylint: disable=protected-access
  import defjax  # pylint: disable=g-import-not-at-top

  assert version == defjax.__version__
  released = re.findall(
      r'^## \[(\d[^\]]*)\]', (REPO / 'CHANGELOG.md').read_text(), re.M
  )
  assert released and released[0] == version


def test_readme_block_is_the_one_after_the_marker():
  block = install_check.readme_block((REPO / 'README.md').read_text())
  assert 'import defjax' in block
  compile(block, 'README.md', 'exec')
  marker = install_check.MARKER
  assert (
      install_check.readme_block(
          f'x\n{marker}\n```python\nA = 1\n```\n```python\nB\n```\n'
      )
      == 'A = 1\n'
  )
  for text in (
      '```python\nA\n```\n',  # no marker
      f'{marker}\n\n```python\nA\n```\n',  # not directly before
      f'{marker}\n```python\nA\n```\n{marker}\n```python\nB\n```\n',
      f'{marker}\n```python\nA\n',
  ):  # not closed
    with pytest.raises(install_check.CheckFailed):
      install_check.readme_block(text)


def test_closure_follows_markers_and_extras():
  requires = {
      'root': [
          'a>=1',
          'b; extra == "x"',
          'c; python_version < "3"',
          'Typing_Extensions',
          'd[fast]',
      ],
      'a': [],
      'b': [],
      'c': [],
      'typing-extensions': [],
      'd': ['e; extra == "fast"', 'f; extra == "slow"'],
      'e': [],
      'f': [],
  }
  assert install_check.closure(requires, 'root') == {
      'root',
      'a',
      'typing-extensions',
      'd',
      'e',
  }
  del requires['e']
  with pytest.raises(install_check.CheckFailed, match='d requires e'):
    install_check.closure(requires, 'root')
