"""A run directory's files, the training program's exit codes, and what a run is.

The trainer writes them, the sweep and the report read them::

  <workdir>/metrics.jsonl   one JSON record per evaluation (step, epoch,
                            train_loss, test_accuracy, test_accuracy_x, lr,
                            wall_time, bytes_sent), in step order
  <workdir>/summary.json    written once, when the run completes or diverges
                            (status, final accuracies, params_sha256, config)
  <workdir>/run.json        one entry per invocation, appended when it starts
                            and completed when it ends: command, code commit
                            (and the diff of a dirty tree), start and end
                            time and step, status, machine and versions
  <workdir>/checkpoints/    orbax checkpoints (``checkpoint``)
  <workdir>/log.txt         the program's output, when run by the sweep

A run's identity (``run_name``, ``IDENTITY``) is written here once: the sweep
names run folders by it and the report parses the names back; a checkpoint
records its fields and the report compares the recipe between seeds.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
from typing import Optional

from defjax import methods

METRICS = 'metrics.jsonl'
SUMMARY = 'summary.json'
RECORD = 'run.json'
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy')

# The exit codes of ``python -m defjax.main`` (and train.py).
EXIT_COMPLETED = 0
EXIT_BAD_CONFIG = 2  # the config or the data cannot run; nothing was trained
EXIT_DIVERGED = 3  # a result: summary.json says where
EXIT_INTERRUPTED = 4  # SIGTERM/SIGINT after a checkpoint: rerun to resume
STATUS_BY_EXIT = {
    EXIT_COMPLETED: 'completed',
    EXIT_BAD_CONFIG: 'bad_config',
    EXIT_DIVERGED: 'diverged',
    EXIT_INTERRUPTED: 'interrupted',
}
FINISHED = ('completed', 'diverged')  # the statuses summary.json records

# A run's identity: its place in a sweep's grid (what ``run_name`` spells)
# and its recipe. A checkpoint records every field (``checkpoint.fingerprint``:
# a resume refuses another run's state, and the run length is a field because
# it fixes where the learning rate decays).
GRID = ('optim.method', 'optim.ratio', 'optim.lam', 'seed')
# What must agree between the seeds of one result (``results.group``): runs
# that differ in any of these are different experiments, and averaging them
# (or counting one's divergence against the other) would report a number
# nobody ran. Each key has the value a config without it ran with (keys added
# to the config later).
RECIPE = {
    'dataset': None,
    'model': None,
    'num_epochs': None,
    'num_train_steps': 0,
    'batch_size': None,
    'num_workers': None,
    'crop_padding': 0,
    'flip': False,
    'sync_batch_stats': True,
    'optim.lr': None,
    'optim.momentum': None,
    'optim.weight_decay': None,
    'optim.schedule': 'step',
    'optim.decay_at': (0.5, 0.75),
    'optim.decay_whole_epochs': False,
    'optim.warmup_epochs': 0.0,
    'optim.dense_warmup_steps': 0,
    'optim.per_leaf': False,
}
# Checked on resume only: the block sequence follows the seed unless pinned,
# and no committed result mixes worker layouts.
RESUME_ONLY = ('model_axis_size', 'devices_per_host', 'optim.block_seed')
IDENTITY = GRID + tuple(RECIPE) + RESUME_ONLY

# The run names, longest method name first so that def_a is not read as def.
_NAME = re.compile(
    r'^(?P<method>'
    + '|'.join(sorted(methods.NAMES, key=len, reverse=True))
    + r')-r(?P<ratio>\d+)'
    r'(?:-lam(?P<lam>[0-9.eE+-]+))?-s(?P<seed>\d+)$'
)


def run_name(method: str, ratio: int, lam: float | None, seed: int) -> str:
  """The workdir name of one run of a sweep, e.g. ``def-r256-lam0.3-s1``;
  no lam part when the run keeps its config's lam."""
  lam_part = '' if lam is None else f'-lam{lam:g}'
  return f'{method}-r{ratio}{lam_part}-s{seed}'


def parse_run_name(name: str) -> Optional[dict]:
  """``run_name``'s fields as strings (``method``, ``ratio``, ``lam``: None
  without a lam part, ``seed``), or None for any other name."""
  m = _NAME.match(name)
  return None if m is None else m.groupdict()


_REQUIRED = object()


def config_value(config, dotted: str, default=_REQUIRED):
  """``config['optim']['ratio']`` for 'optim.ratio', in a ConfigDict or in
  a summary's dict; ``default`` where a part is missing (without one, a
  KeyError naming ``dotted``)."""
  node = config
  for part in dotted.split('.'):
    try:
      node = node[part]
    except (KeyError, TypeError):  # TypeError: a leaf (number, string, list)
      if default is _REQUIRED:
        raise KeyError(dotted) from None
      return default
  return node


def write_json(path: str | os.PathLike, obj) -> None:
  """Writes ``obj`` atomically: a reader never sees half a file."""
  path = str(path)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def total_steps(num_train_steps, num_epochs, steps_per_epoch: int) -> int:
  """T, the steps a run trains for: its step budget when positive, else
  num_epochs whole or fractional epochs (the trainer's loop, and what reports
  give as a diverged run's planned length)."""
  if num_train_steps > 0:
    return int(num_train_steps)
  return int(num_epochs * steps_per_epoch)


def utc_now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds'
  )


def git_state(path: str | os.PathLike | None, *, diff: bool = False) -> dict:
  """The commit of the checkout holding ``path`` and whether its tree is dirty;
  with ``diff``, a dirty tree's ``git diff HEAD`` and untracked files too
  (None values outside a checkout or without git)."""

  def git(*args):
    return subprocess.run(
        ['git', *args],
        cwd=path,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout

  try:
    state = {'commit': git('rev-parse', 'HEAD').strip()}
    status = git('status', '--porcelain')
    state['dirty'] = bool(status.strip())
    if diff and state['dirty']:
      state['diff'] = git('diff', 'HEAD')
      state['untracked'] = [
          line[3:] for line in status.splitlines() if line.startswith('??')
      ]
  except (OSError, subprocess.SubprocessError):
    state = {'commit': None, 'dirty': None}
  return state


def environment(
    path: str | os.PathLike | None = None, *, diff: bool = False
) -> dict:
  """The machine, the package versions and ``git_state(path)``."""
  versions = {}
  for package in PACKAGES:
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  return {
      'machine': {
          'platform': platform.platform(),
          'processor': platform.processor() or platform.machine(),
          'cpu_count': os.cpu_count(),
          'hostname': platform.node(),
          'python': platform.python_version(),
      },
      'packages': versions,
      'git': git_state(path, diff=diff),
  }


class Invocation:
  """This invocation's entry in ``run.json``, which keeps every earlier one.

  A sweep's ``sweep.json`` describes its last invocation only; this record
  lives in the run's own folder, so no later sweep, resume or copy of the
  folder can lose when, where and from which code each part of the run was
  trained. Entering appends the entry (status 'running'); leaving completes
  it with the end time, the status (an exception's ``status`` attribute, or
  'failed'; 'completed' without one) and the step reached (an exception's
  ``step``, else ``end_step``). The commit is that of the checkout holding
  the running defjax package, with the diff when its tree is dirty.

  An invocation that never left (SIGKILL, a machine that stopped) stays
  'running' until the next one enters: that one marks it 'killed', with no
  end time (it is unknown) and the step it resumes from as its end step,
  the last step of that invocation's work the run keeps.
  """

  def __init__(
      self,
      workdir: str | os.PathLike,
      start_step: int,
      end_step: int,
      *,
      enabled: bool = True,
  ):
    self.path = pathlib.Path(workdir) / RECORD
    self.start_step, self.end_step, self.enabled = start_step, end_step, enabled

  def _entries(self) -> list[dict]:
    try:
      return json.loads(self.path.read_text())['invocations']
    except (OSError, ValueError, KeyError, TypeError):
      return []

  def __enter__(self):
    if self.enabled:
      source = pathlib.Path(__file__).resolve().parent
      entries = self._entries()
      for entry in entries:
        if entry.get('status') == 'running':
          entry.update(status='killed', end_step=self.start_step)
      self.index = len(entries)
      entries.append(
          {
              'command': list(sys.orig_argv),
              'cwd': os.getcwd(),
              'started': utc_now(),
              'start_step': self.start_step,
              'status': 'running',
              **environment(source, diff=True),
          }
      )
      write_json(self.path, {'invocations': entries})
    return self

  def __exit__(self, exc_type, exc, tb):
    if self.enabled:
      entries = self._entries()
      if self.index < len(entries):
        entries[self.index].update(
            ended=utc_now(),
            status='completed'
            if exc is None
            else getattr(exc, 'status', 'failed'),
            end_step=getattr(
                exc, 'step', self.end_step if exc is None else None
            ),
        )
        write_json(self.path, {'invocations': entries})
    return False


def read_invocations(workdir: str | os.PathLike) -> list[dict]:
  """``run.json``'s entries, oldest first ([] for a run from before it existed)."""
  try:
    return json.loads((pathlib.Path(workdir) / RECORD).read_text())[
        'invocations'
    ]
  except (OSError, ValueError, KeyError, TypeError):
    return []


def write_summary(workdir: str | os.PathLike, summary: dict) -> None:
  """Writes summary.json with ``finished``, the UTC time the run ended (a
  sweep's record only dates the sweep's last invocation)."""
  write_json(
      pathlib.Path(workdir) / SUMMARY, {**summary, 'finished': utc_now()}
  )


def read_summary(workdir: str | os.PathLike) -> Optional[dict]:
  """The run's summary; None while it is unfinished (or cut off mid-write)."""
  try:
    return json.loads((pathlib.Path(workdir) / SUMMARY).read_text())
  except (OSError, ValueError):
    return None


def finished_status(workdir: str | os.PathLike) -> Optional[str]:
  """'completed' or 'diverged' from summary.json; None for an unfinished run."""
  summary = read_summary(workdir)
  return None if summary is None else summary.get('status', 'completed')


def append_metrics(workdir: str | os.PathLike, record: dict) -> None:
  with open(pathlib.Path(workdir) / METRICS, 'a') as f:
    f.write(json.dumps(record) + '\n')


def truncate_metrics(workdir: str | os.PathLike, step: int) -> None:
  """Drops records after ``step`` (written before a kill, not in the checkpoint)."""
  path = pathlib.Path(workdir) / METRICS
  if step == 0:
    path.unlink(missing_ok=True)
    return
  if not path.exists():
    return
  keep = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line)['step'] <= step:
        keep.append(line + '\n')
    except (ValueError, KeyError, TypeError):
      pass  # a line cut off by the kill: the record is not in the checkpoint
  tmp = path.with_name(METRICS + '.tmp')
  tmp.write_text(''.join(keep))
  os.replace(tmp, path)


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """Every record in step order; a cut-off line is skipped, a re-evaluated
  step (a resumed run) keeps its later record."""
  path = pathlib.Path(workdir) / METRICS
  if not path.exists():
    return []
  rows = {}
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue  # a line cut off by an interrupted write
    rows[row.get('step', len(rows))] = row
  return [rows[k] for k in sorted(rows)]


def last_metrics(workdir: str | os.PathLike) -> dict:
  """The last complete record, read from the end of the file ({} if none).

  Cheap on a long run's file, so a sweep can poll it while the run goes on.
  """
  try:
    with open(pathlib.Path(workdir) / METRICS, 'rb') as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 4096))
      lines = f.read().splitlines()
  except OSError:
    return {}
  for line in reversed(lines):
    try:
      return json.loads(line)
    except ValueError:
      continue  # the line being written, or the tail of a cut-off one
  return {}
