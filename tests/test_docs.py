"""Every code block of the README and the docs pages is checked.

Python blocks run: each page's blocks in order, in one namespace per page,
on the 8 test devices (an example that stops working fails here). Shell
blocks are checked statically: the make targets, config files, config keys,
modules and scripts they name exist.
"""

import functools
import importlib
import importlib.util
import pathlib
import re
import shlex
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / 'README.md', *(p for p in (ROOT / 'docs').rglob('*.md')
                                      if '_build' not in p.parts)])
FENCE = re.compile(r'^(?P<indent> *)```(?P<lang>[\w{}-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```',
                   re.S | re.M)
# Untagged blocks are commands too (the README's are).
SHELL = ('bash', 'sh', 'shell', 'console', '')


def blocks(path: pathlib.Path, langs) -> list[str]:
  """The bodies of ``path``'s fenced blocks in one of ``langs``, in order."""
  out = []
  for m in FENCE.finditer(path.read_text()):
    if m.group('lang') in langs:
      indent = len(m.group('indent'))
      out.append(''.join(line[indent:] for line in m.group('body').splitlines(True)))
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


@pytest.mark.parametrize('name', PYTHON_PAGES)
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
      found += [f'make target {t!r}' for t in tokens[1:]
                if not t.startswith('-') and '=' not in t and t not in targets]
      continue
    if program.startswith('python'):
      if len(tokens) > 2 and tokens[1] == '-m':
        module = tokens[2]
        if module.split('.')[0] in ('defjax', 'bench', 'configs') and \
            importlib.util.find_spec(module) is None:
          found.append(f'module {module!r}')
      elif len(tokens) > 1 and tokens[1].endswith('.py') and not (ROOT / tokens[1]).exists():
        found.append(f'script {tokens[1]!r}')
    config, keys = None, []
    args = iter(tokens[1:])
    for arg in args:
      if arg == '--config':
        config = next(args, None)
      elif arg.startswith('--config='):
        config = arg.split('=', 1)[1]
      elif arg.startswith('--config.'):
        keys.append(arg[len('--config.'):].split('=', 1)[0])
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
  assert problems('python train.py --config configs/nope.py') == ["config 'configs/nope.py'"]
  assert problems('python train.py --config configs/fashion_mnist.py \\\n'
                  '  --config.optim.no_such=1') == [
                      "config key 'optim.no_such' of configs/fashion_mnist.py"]
  assert problems('python -m defjax.no_such_module') == ["module 'defjax.no_such_module'"]
  assert problems('make train && python -m defjax.main --config configs/fashion_mnist.py'
                  ' --config.optim.ratio=16') == []
  page = tmp_path / 'page.md'
  page.write_text('Text.\n\n```python\nx = 2\n```\n\n  ```python\n  y = 1 / (x - 2)\n  ```\n')
  with pytest.raises(ZeroDivisionError):
    run_blocks(page)
