r"""make install-check: the install promise, checked from a built wheel.

``pip install defjax`` brings jax, flax, optax and numpy and nothing of the
training program. This builds the sdist from a copy of the checkout and the
wheel from that sdist (``python -m build``), installs the wheel without
extras into a fresh virtual environment and checks, there:

1. the installed distributions are exactly defjax, its four core dependencies
   and their dependency closure, computed from the installed metadata;
2. every library module imports (all of defjax but the training program and
   the experiment tools; the models too, which the library's examples use);
3. the README's library example runs: the python block right after the line
   ``MARKER`` in README.md, read from the checkout, not a copy;
4. ``defjax-train``, ``python -m defjax.main`` and ``train.py`` answer with
   one line on stderr naming ``defjax[train]``, and exit 2.

It prints what it checked, exits 1 on the first failure, and removes
everything it made (one temporary folder). It lives beside
tests/test_install.py, which checks its pieces (the README block, the
closure) in the suite without building anything; pytest does not collect it.

  python tests/install_check.py
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The library's promise (pyproject's [project] dependencies).
CORE = ('jax', 'flax', 'optax', 'numpy')
MARKER = (
    '<!-- install-check: the next python block runs in make install-check -->'
)
# The program half and the shims that import it at the top; the models are
# imported on their own (the library's examples use them).
PROGRAM = (
    'defjax.training',
    'defjax.experiments',
    'defjax.sweep',
    'defjax.report',
    'defjax.gap',
)
MODELS = 'defjax.training.models'
ENTRY_LINE = "error: the training program needs pip install 'defjax[train]'"


class CheckFailed(Exception):
  """A broken promise: the message says which."""


def readme_block(text: str) -> str:
  """The body of the python block on the line after ``MARKER``."""
  lines = text.splitlines(keepends=True)
  at = [i for i, line in enumerate(lines) if line.strip() == MARKER]
  if len(at) != 1:
    raise CheckFailed(f'README.md has {len(at)} lines {MARKER!r}, not one')
  start = at[0] + 1
  if start == len(lines) or lines[start].rstrip() != '```python':
    raise CheckFailed(
        'the line after the install-check marker in README.md'
        ' does not open a ```python block'
    )
  for end in range(start + 1, len(lines)):
    if lines[end].rstrip() == '```':
      return ''.join(lines[start + 1 : end])
  raise CheckFailed('the install-check block in README.md is not closed')


def closure(requires: dict[str, list[str]], root: str) -> set[str]:
  """The distributions ``root`` needs, itself included, without its extras.

  Args:
    requires: each installed distribution's requirement strings (its
      metadata's Requires-Dist), by normalised name.
    root: the distribution to start from.

  Returns:
    Normalised names. A requirement counts when its marker holds here, with
    ``extra`` set to each extra it was asked with (none for ``root``).
  """
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  from packaging.utils import canonicalize_name  # pylint: disable=g-import-not-at-top

  needed, seen = set(), set()
  todo = [(canonicalize_name(root), frozenset(), None)]
  while todo:
    name, extras, parent = todo.pop()
    if (name, extras) in seen:
      continue
    seen.add((name, extras))
    if name not in requires:
      raise CheckFailed(f'{parent} requires {name}, which is not installed')
    needed.add(name)
    for line in requires[name]:
      req = Requirement(line)
      if req.marker is None or any(
          req.marker.evaluate({'extra': e}) for e in extras | {''}
      ):
        todo.append((canonicalize_name(req.name), frozenset(req.extras), name))
  return needed


def _run(cmd, *, cwd, env, what, expect=0):
  proc = subprocess.run(
      [str(c) for c in cmd],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  if proc.returncode != expect:
    tail = (proc.stdout + proc.stderr)[-3000:]
    raise CheckFailed(f'{what}: exit {proc.returncode}, not {expect}\n{tail}')
  return proc


def _static_version() -> str:
  """defjax.__version__ as the checkout writes it (no import)."""
  tree = ast.parse((ROOT / 'defjax' / '__init__.py').read_text())
  for node in tree.body:
    targets = [getattr(t, 'id', None) for t in getattr(node, 'targets', ())]
    # setuptools reads a literal without importing defjax, whose import needs
    # jax, which the build environment lacks; a version is a string.
    if isinstance(node, ast.Assign) and targets == ['__version__']:
      value = node.value
      if isinstance(value, ast.Constant) and isinstance(value.value, str):
        return value.value
  raise CheckFailed('defjax/__init__.py assigns __version__ no string literal')


def _copy_checkout(dest: pathlib.Path) -> None:
  """The files git would commit (tracked or new, not ignored), as they are."""
  git = ['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard']
  out = subprocess.run(git, cwd=ROOT, capture_output=True, check=True).stdout
  for name in filter(None, out.decode().split('\0')):
    # A tracked file deleted from the work tree is listed, but not there.
    if (ROOT / name).is_file():
      (dest / name).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(ROOT / name, dest / name)


def build(tmp: pathlib.Path, version: str) -> pathlib.Path:
  """Builds the sdist and, from it, the wheel; checks what each carries."""
  start = time.monotonic()
  src, dist = tmp / 'src', tmp / 'dist'
  _copy_checkout(src)
  _run(
      [sys.executable, '-m', 'build', '--outdir', dist, src],
      cwd=tmp,
      env=os.environ,
      what='python -m build',
  )
  sdist = dist / f'defjax-{version}.tar.gz'
  wheel = dist / f'defjax-{version}-py3-none-any.whl'
  built = sorted(p.name for p in dist.iterdir())
  if built != sorted([sdist.name, wheel.name]):
    raise CheckFailed(f'built {built}, expected {sdist.name} and {wheel.name}')

  with tarfile.open(sdist) as tar:
    in_sdist = {n.split('/', 1)[1] for n in tar.getnames() if '/' in n}
  program = {
      'train.py',
      'CHANGELOG.md',
      'README.md',
      'pyproject.toml',
      *(str(p.relative_to(src)) for p in (src / 'configs').glob('*.py')),
  }
  if program - in_sdist:
    raise CheckFailed(f'the sdist lacks {sorted(program - in_sdist)}')
  if any(n.startswith('tests/') for n in in_sdist):
    raise CheckFailed('the sdist carries tests/ (MANIFEST.in prunes it)')

  with zipfile.ZipFile(wheel) as whl:
    in_wheel = set(whl.namelist())
  tops = {n.split('/', 1)[0] for n in in_wheel}
  if tops != {'defjax', f'defjax-{version}.dist-info'}:
    raise CheckFailed(f'the wheel holds {sorted(tops)}, not only defjax')
  modules = {str(p.relative_to(src)) for p in (src / 'defjax').rglob('*.py')}
  if modules - in_wheel:
    missing = sorted(modules - in_wheel)
    raise CheckFailed(f'the wheel built from the sdist lacks {missing}')
  print(
      f'install-check: built {sdist.name} ({len(in_sdist)} files; configs/,'
      f' train.py and CHANGELOG.md in, tests/ out) and from it {wheel.name}'
      f' ({len(in_wheel)} files: the defjax package only, all'
      f' {len(modules)} modules of the checkout) in'
      f' {time.monotonic() - start:.0f} s'
  )
  return wheel


def _user_env() -> dict[str, str]:
  """This environment without what would point Python or JAX elsewhere: a new
  user's shell."""
  return {
      k: v
      for k, v in os.environ.items()
      if not k.startswith(('PYTHON', 'JAX_', 'XLA_')) and k != 'VIRTUAL_ENV'
  }


_INSTALLED = """
import importlib.metadata as m, json
print(json.dumps({d.metadata['Name']: [d.version, d.requires or []]
                  for d in m.distributions()}))
"""

_LIBRARY = f"""
import importlib, pkgutil
import defjax
program = {PROGRAM!r}
imported = []
def walk(package):
  for info in pkgutil.iter_modules(package.__path__, package.__name__ + '.'):
    if info.name.startswith(program) and not info.name.startswith({MODELS!r}):
      continue
    module = importlib.import_module(info.name)
    imported.append(info.name)
    if info.ispkg:
      walk(module)
walk(defjax)
walk(importlib.import_module({MODELS!r}))
print(defjax.__file__, defjax.__version__, ' '.join(['defjax', {MODELS!r}] + imported))
"""


def install(tmp: pathlib.Path, wheel: pathlib.Path, version: str):
  """A fresh venv holding the wheel, no extras; checks what pip put there."""
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  from packaging.utils import canonicalize_name  # pylint: disable=g-import-not-at-top

  start = time.monotonic()
  venv = tmp / 'venv'
  # No pip or setuptools of its own: whatever is there, the wheel brought.
  _run(
      [sys.executable, '-m', 'venv', '--without-pip', venv],
      cwd=tmp,
      env=_user_env(),
      what='python -m venv',
  )
  python = venv / 'bin' / 'python'
  pip = [sys.executable, '-m', 'pip', '--python', python]
  _run(
      [*pip, 'install', '-q', '--no-input', wheel],
      cwd=tmp,
      env=os.environ,
      what='pip install',
  )

  out = _run(
      [python, '-I', '-c', _INSTALLED],
      cwd=tmp,
      env=_user_env(),
      what='reading the installed metadata',
  ).stdout
  installed = {
      canonicalize_name(name): (name, v, req)
      for name, (v, req) in json.loads(out).items()
  }
  requires = {n: req for n, (_, _, req) in installed.items()}
  direct = {
      canonicalize_name(r.name)
      for r in map(Requirement, requires['defjax'])
      if r.marker is None or r.marker.evaluate({'extra': ''})
  }
  if direct != set(CORE):
    raise CheckFailed(f'defjax requires {sorted(direct)}, not {list(CORE)}')
  needed = closure(requires, 'defjax')
  if set(installed) != needed:
    raise CheckFailed(
        f'installed beyond the closure: {sorted(set(installed) - needed)};'
        f' missing from it: {sorted(needed - set(installed))}'
    )
  if installed['defjax'][1] != version:
    raise CheckFailed(
        f'installed defjax {installed["defjax"][1]}, not {version}'
    )
  shown = lambda names: ', '.join(
      f'{installed[n][0]} {installed[n][1]}' for n in sorted(names)
  )
  print(
      f'install-check: pip install {wheel.name} (no extras) into a fresh venv:'
      f' {len(installed)} distributions, exactly defjax {version}, its'
      f' requirements {shown(direct)} and their closure from the installed'
      f' metadata: {shown(needed - direct - {"defjax"})}; in'
      f' {time.monotonic() - start:.0f} s'
  )
  return python


def check_library(python: pathlib.Path, run_dir: pathlib.Path, version: str):
  out = _run(
      [python, '-I', '-c', _LIBRARY],
      cwd=run_dir,
      env=_user_env(),
      what='importing the library',
  ).stdout.split()
  where, got, modules = out[0], out[1], out[2:]
  site = python.parent.parent
  if not pathlib.Path(where).resolve().is_relative_to(site.resolve()):
    raise CheckFailed(f'defjax came from {where}, not from the venv {site}')
  if got != version:
    raise CheckFailed(f'defjax.__version__ is {got}, the wheel {version}')
  print(
      f'install-check: the library imports with the core dependencies only:'
      f' {len(modules)} modules ({", ".join(modules)}); defjax.__version__'
      f' {got} from the venv'
  )


def check_readme(python: pathlib.Path, run_dir: pathlib.Path):
  block = readme_block((ROOT / 'README.md').read_text())
  script = run_dir / 'readme_library.py'
  script.write_text(block)
  start = time.monotonic()
  _run(
      [python, '-I', script],
      cwd=run_dir,
      env=_user_env(),
      what="README.md's library example",
  )
  print(
      f"install-check: README.md's library example ({len(block.splitlines())}"
      f' lines, the python block after the install-check marker) ran in'
      f' {time.monotonic() - start:.0f} s'
  )


def check_entry_points(python: pathlib.Path, tmp: pathlib.Path):
  runs = {
      'defjax-train': ([python.parent / 'defjax-train'], tmp / 'run'),
      'python -m defjax.main': ([python, '-m', 'defjax.main'], tmp / 'run'),
      'python train.py (checkout)': ([python, 'train.py'], tmp / 'src'),
  }
  lines = set()
  for name, (cmd, cwd) in runs.items():
    proc = _run(cmd, cwd=cwd, env=_user_env(), what=name, expect=2)
    err = proc.stderr.splitlines()
    if proc.stdout or len(err) != 1 or not err[0].startswith(ENTRY_LINE):
      raise CheckFailed(
          f'{name}: stdout {proc.stdout!r}, stderr {proc.stderr!r};'
          f' expected one line starting {ENTRY_LINE!r}'
      )
    lines.add(err[0])
  print(
      f'install-check: {", ".join(runs)}: exit 2, stdout empty, one line on'
      f' stderr: {" | ".join(sorted(lines))}'
  )


def main() -> int:
  start = time.monotonic()
  with tempfile.TemporaryDirectory(prefix='defjax-install-check-') as name:
    tmp = pathlib.Path(name)
    try:
      version = _static_version()
      wheel = build(tmp, version)
      python = install(tmp, wheel, version)
      (tmp / 'run').mkdir()
      check_library(python, tmp / 'run', version)
      check_readme(python, tmp / 'run')
      check_entry_points(python, tmp)
    except CheckFailed as e:
      print(f'install-check: FAILED: {e}', file=sys.stderr)
      return 1
  print(
      f'install-check: passed in {time.monotonic() - start:.0f} s'
      f' (temporary folder {name} removed)'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
