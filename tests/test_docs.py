"""Every code block of the README and the docs pages is checked.

Python blocks run: each page's blocks in order, in one namespace per page,
on the 8 test devices (an example that stops working fails here). Shell
blocks are checked statically: the make targets, config files, config keys,
modules and scripts they name exist.
"""

import functools
import importlib
import importlib.util
import inspect
import pathlib
import pkgutil
import re
import shlex
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted(
    [
        ROOT / 'README.md',
        *(p for p in (ROOT / 'docs').rglob('*.md') if '_build' not in p.parts),
    ]
)
FENCE = re.compile(
    r'^(?P<indent> *)```(?P<lang>[\w{}-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```',
    re.S | re.M,
)
# Untagged blocks are commands too (the README's are).
SHELL = ('bash', 'sh', 'shell', 'console', '')


def blocks(path: pathlib.Path, langs) -> list[str]:
  """The bodies of ``path``'s fenced blocks in one of ``langs``, in order."""
  out = []
  for m in FENCE.finditer(path.read_text()):
    if m.group('lang') in langs:
      indent = len(m.group('indent'))
      out.append(
          ''.join(line[indent:] for line in m.group('body').splitlines(True))
      )
  return out


def _name(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT))


def run_blocks(path: pathlib.Path) -> dict:
  """Runs a page's Python blocks in order; returns the namespace they leave."""
  namespace = {'__name__': f'docs:{path.name}'}
  for i, code in enumerate(blocks(path, ('python',))):
    exec(compile(code, f'{path} (python block {i + 1})', 'exec'), namespace)
  return namespace


@functools.lru_cache(maxsize=None)
def run_page(name: str) -> dict:
  """``run_blocks`` of a page of this checkout, once per test process."""
  return run_blocks(ROOT / name)


PYTHON_PAGES = [_name(p) for p in PAGES if blocks(p, ('python',))]
SHELL_PAGES = [_name(p) for p in PAGES if blocks(p, SHELL)]


# docs/guides/nnx.md's blocks run in test_nnx, which checks what they leave.
@pytest.mark.parametrize(
    'name', [n for n in PYTHON_PAGES if n != 'docs/guides/nnx.md']
)
def test_python_blocks_run(name):
  run_page(name)


def _make_targets() -> set[str]:
  text = (ROOT / 'Makefile').read_text()
  return set(re.findall(r'^([\w.-]+):', text, re.M))


def _config_keys(path: str) -> set[str]:
  """Every dotted key of a config file's ``get_config()``."""
  spec = importlib.util.spec_from_file_location('_doc_config', ROOT / path)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, str(ROOT))
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(ROOT))
  keys = set()

  def walk(node, prefix):
    for key, value in node.items():
      keys.add(prefix + key)
      if hasattr(value, 'items'):
        walk(value, prefix + key + '.')

  walk(module.get_config(), '')
  return keys


def _commands(script: str):
  """Each command of a shell block as a token list (continuations joined,
  prompts and comments dropped)."""
  script = re.sub(r'\\\n', ' ', script)
  for line in script.splitlines():
    line = line.strip()
    if line.startswith('$ '):
      line = line[2:]
    if not line or line.startswith('#'):
      continue
    for part in re.split(r'&&|;|\|', line):
      try:
        tokens = shlex.split(part, comments=True)
      except ValueError:
        continue
      while tokens and '=' in tokens[0] and not tokens[0].startswith('-'):
        tokens = tokens[1:]  # VAR=value prefixes
      if tokens:
        yield tokens


def problems(script: str) -> list[str]:
  """What a shell block names that does not exist."""
  found = []
  targets = _make_targets()
  for tokens in _commands(script):
    program = pathlib.Path(tokens[0]).name
    if program == 'make':
      found += [
          f'make target {t!r}'
          for t in tokens[1:]
          if not t.startswith('-') and '=' not in t and t not in targets
      ]
      continue
    if program.startswith('python'):
      if len(tokens) > 2 and tokens[1] == '-m':
        module = tokens[2]
        if (
            module.split('.')[0] in ('defjax', 'bench', 'configs')
            and importlib.util.find_spec(module) is None
        ):
          found.append(f'module {module!r}')
      elif (
          len(tokens) > 1
          and tokens[1].endswith('.py')
          and not (ROOT / tokens[1]).exists()
      ):
        found.append(f'script {tokens[1]!r}')
    config, keys = None, []
    args = iter(tokens[1:])
    for arg in args:
      if arg == '--config':
        config = next(args, None)
      elif arg.startswith('--config='):
        config = arg.split('=', 1)[1]
      elif arg.startswith('--config.'):
        keys.append(arg[len('--config.') :].split('=', 1)[0])
    if config is not None and not config.startswith(('/', '$')):
      if not (ROOT / config).exists():
        found.append(f'config {config!r}')
        continue
      known = _config_keys(config)
      found += [f'config key {k!r} of {config}' for k in keys if k not in known]
  return found


@pytest.mark.parametrize('name', SHELL_PAGES)
def test_shell_blocks_name_what_exists(name):
  bad = [p for script in blocks(ROOT / name, SHELL) for p in problems(script)]
  assert not bad, f'{name} names what does not exist: {bad}'


def test_the_checks_can_fail(tmp_path):
  assert problems('make no-such-target') == ["make target 'no-such-target'"]
  assert problems('python train.py --config configs/nope.py') == [
      "config 'configs/nope.py'"
  ]
  assert problems(
      'python train.py --config configs/fashion_mnist.py \\\n'
      '  --config.optim.no_such=1'
  ) == ["config key 'optim.no_such' of configs/fashion_mnist.py"]
  assert problems('python -m defjax.no_such_module') == [
      "module 'defjax.no_such_module'"
  ]
  assert (
      problems(
          'make train && python -m defjax.main --config configs/fashion_mnist.py'
          ' --config.optim.ratio=16'
      )
      == []
  )
  page = tmp_path / 'page.md'
  page.write_text(
      'Text.\n\n```python\nx = 2\n```\n\n  ```python\n  y = 1 / (x - 2)\n  ```\n'
  )
  with pytest.raises(ZeroDivisionError):
    run_blocks(page)


# ------------------------------------------------------------ API reference

API_DIR = ROOT / 'docs' / 'api'
# An autodoc (or py:) directive, in an {eval-rst} block of an API page (MyST
# would read the rST that autodoc generates as Markdown), or a module declared.
_DIRECTIVE = re.compile(
    r'^ *\.\. (?P<kind>auto\w+|py:\w+):: +(?P<target>[\w.]+)', re.M
)
_MODULE = re.compile(r'^ *\.\. (?:py:)?module:: +(?P<target>[\w.]+)', re.M)
# Modules that only keep an old command name working (``python -m defjax.sweep``
# and friends): each runs a documented module's main.
SHIMS = ('defjax.sweep', 'defjax.report', 'defjax.gap')
# Modules reached only through their package's documented names: the model
# zoo is get_model(name), one module per network.
BEHIND_PACKAGE = ('defjax.training.models.',)


def _resolve(dotted: str):
  """The object a dotted name names (a module, or an attribute path in one)."""
  parts = dotted.split('.')
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module('.'.join(parts[:i]))
    except ImportError:
      continue
    for attr in parts[i:]:
      obj = getattr(obj, attr)
    return obj
  raise ImportError(dotted)


def public_names(module) -> list[str]:
  """A module's public names: its ``__all__``; without one, the functions and
  classes it defines and its UPPER_CASE constants, unless they start with _."""
  if hasattr(module, '__all__'):
    return list(module.__all__)
  out = []
  for name, value in vars(module).items():
    if name.startswith('_'):
      continue
    if inspect.isfunction(value) or inspect.isclass(value):
      if value.__module__ == module.__name__:
        out.append(name)
    elif name.isupper() and not inspect.ismodule(value):
      out.append(name)
  return out


def api_text(directory=API_DIR) -> str:
  return '\n'.join(
      p.read_text() for p in sorted(pathlib.Path(directory).rglob('*.md'))
  )


def documented_modules(text: str) -> list[str]:
  """The modules the API pages document (automodule or a module directive)."""
  found = [
      m['target']
      for m in _DIRECTIVE.finditer(text)
      if m['kind'] == 'automodule'
  ]
  return sorted(set(found + [m['target'] for m in _MODULE.finditer(text)]))


def missing_from_api(text: str) -> list[str]:
  """Every public name of a documented module that no directive documents:
  neither by its own dotted name nor, for a function, class or module, as
  the same object under another name (``defjax.rbgs`` is
  ``defjax.compress.rbgs``)."""
  targets = {m['target'] for m in _DIRECTIVE.finditer(text)}
  targets |= set(documented_modules(text))
  objects = {id(_resolve(t)) for t in targets}
  missing = []
  for module_name in documented_modules(text):
    module = importlib.import_module(module_name)
    for name in public_names(module):
      value = getattr(module, name)
      by_identity = (
          inspect.isfunction(value)
          or inspect.isclass(value)
          or inspect.ismodule(value)
      )
      if f'{module_name}.{name}' not in targets and not (
          by_identity and id(value) in objects
      ):
        missing.append(f'{module_name}.{name}')
  return missing


def undocumented_modules(text: str, package: str = 'defjax') -> list[str]:
  """Modules of ``package`` the API pages neither document nor cover: a
  module is covered by a package with ``__all__`` (its implementation), by
  being a shim, or by ``BEHIND_PACKAGE``."""
  documented = set(documented_modules(text))
  root = importlib.import_module(package)
  out = []
  for info in pkgutil.walk_packages(root.__path__, package + '.'):
    name = info.name
    parent = importlib.import_module(name.rsplit('.', 1)[0])
    if (
        name in documented
        or name in SHIMS
        or name.startswith(BEHIND_PACKAGE)
        or hasattr(parent, '__all__')
        and parent.__name__ != package
    ):
      continue
    out.append(name)
  return out


def test_every_public_name_is_in_the_api_reference():
  text = api_text()
  assert 'defjax' in documented_modules(text)
  assert not missing_from_api(text), missing_from_api(text)


def test_every_module_is_in_the_api_reference():
  assert not undocumented_modules(api_text())


def test_the_api_checks_can_fail():
  text = api_text()
  # A name dropped from the pages is reported under its module's name...
  without = re.sub(r'^\.\. autofunction:: defjax\.rbgs\n', '', text, flags=re.M)
  assert without != text
  assert missing_from_api(without) == ['defjax.rbgs', 'defjax.compress.rbgs']
  # ... also when documented under another module's name only.
  assert 'defjax.feedback.check_lam' in missing_from_api(
      text.replace(
          'autofunction:: defjax.feedback.check_lam',
          'autofunction:: os.path.join',
      )
  )
  # A constant counts only under its own name.
  assert 'defjax.xla_cpu.CPU_COLLECTIVE_FLAGS' in missing_from_api(
      text.replace(
          'autodata:: defjax.xla_cpu.CPU_COLLECTIVE_FLAGS', 'autodata:: os.sep'
      )
  )
  # A module without a page is reported, with every public name of it.
  no_wire = text.replace('automodule:: defjax.wire', 'automodule:: os')
  assert 'defjax.wire' in undocumented_modules(no_wire)
  assert 'os.sep' in missing_from_api(no_wire)
