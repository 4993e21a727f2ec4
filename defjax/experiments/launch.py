"""One training run of a sweep: its command, how it is launched and watched.

A run is ``python -m defjax.main`` (or a script taking the same flags) in a
child process, its output appended to ``<workdir>/log.txt`` so that a resumed
run keeps the log of its earlier attempts. Its end is read from the exit code
(``defjax.training.runfiles``) and checked against ``summary.json``. While it goes,
``StatusLines`` shows one line per run, refreshed from the run's last
``metrics.jsonl`` record.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shlex
import subprocess
import time
from collections.abc import Sequence

from defjax.training import runfiles


@dataclasses.dataclass
class Job:
  """One training run a sweep launches (a cell of its grid) and what became
  of it. (``results.Run`` is a run folder read back from disk.)"""

  method: str
  ratio: int
  lam: float | None
  seed: int
  name: str
  workdir: pathlib.Path
  command: list[str]
  status: str = 'pending'
  returncode: int | None = None
  elapsed_s: float | None = None
  launched: bool = False

  def record(self) -> dict:
    """Its entry in the sweep's ``sweep.json``."""
    return {
        'name': self.name,
        'method': self.method,
        'ratio': self.ratio,
        'lam': self.lam,
        'seed': self.seed,
        'workdir': str(self.workdir),
        'command': shlex.join(self.command),
        'status': self.status,
        'returncode': self.returncode,
        'elapsed_s': self.elapsed_s,
        'launched': self.launched,
    }


def _format_elapsed(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m:02d}:{s:02d}'


def progress_detail(workdir: pathlib.Path) -> str:
  """The run's last evaluation: step, epoch, test accuracy ('' before one)."""
  last = runfiles.last_metrics(workdir)
  if not last:
    return ''
  parts = []
  if isinstance(last.get('step'), int):
    parts.append(f'step {last["step"]}')
  if isinstance(last.get('epoch'), (int, float)):
    parts.append(f'epoch {last["epoch"]:.3g}')
  if isinstance(last.get('test_accuracy'), (int, float)):
    parts.append(f'test accuracy {last["test_accuracy"]:.4g}')
  return ', '.join(parts)


class StatusLines:
  """One line per run of a sweep; on a terminal the running line updates in
  place. (``hooks.Progress`` is a training run's own progress bar.)"""

  def __init__(self, total: int, stream):
    self._total = total
    self._stream = stream
    self._live = stream.isatty()
    self._width = len(str(total))

  def _prefix(self, index: int, run: Job) -> str:
    return f'[{index:>{self._width}}/{self._total}] {run.name}'

  def update(self, index: int, run: Job, elapsed: float, detail: str = ''):
    if not self._live:
      return
    line = f'{self._prefix(index, run)}  running {_format_elapsed(elapsed)}'
    if detail:
      line += f'  ({detail})'
    self._stream.write('\r\033[K' + line)
    self._stream.flush()

  def start(self, index: int, run: Job):
    if self._live:
      self.update(index, run, 0.0)
    else:
      print(
          f'{self._prefix(index, run)}  running', file=self._stream, flush=True
      )

  def done(self, index: int, run: Job, detail: str = ''):
    line = f'{self._prefix(index, run)}  {run.status}'
    if run.elapsed_s is not None:
      line += f' {_format_elapsed(run.elapsed_s)}'
    if detail:
      line += f'  ({detail})'
    if self._live:
      self._stream.write('\r\033[K')
    print(line, file=self._stream, flush=True)


def config_path(command: Sequence[str]) -> str:
  """The config file of a run's command (without a ``:override`` part)."""
  return command[command.index('--config') + 1].partition(':')[0]


def launch(run: Job, index: int, progress: StatusLines, poll_s: float) -> None:
  """Runs ``run`` to its end, its output appended to ``log.txt``.

  Sets the run's ``status``, ``returncode`` and ``elapsed_s``. On Ctrl-C it
  waits for the child to checkpoint and exit, records the run as
  interrupted and raises the KeyboardInterrupt again, so that the sweep stops.
  """
  run.workdir.mkdir(parents=True, exist_ok=True)
  progress.start(index, run)
  run.launched = True
  start = time.monotonic()
  # Append: a resumed run keeps the log of its earlier attempts.
  with open(run.workdir / 'log.txt', 'ab') as log:
    log.write(f'\n$ {shlex.join(run.command)}\n'.encode())
    log.flush()
    # Unbuffered, so that log.txt is current while the run is going.
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    # A config imports its siblings as a package (``from configs import
    # default``): put the folder above the config's folder on the path, so
    # the sweep works from any directory and with an installed defjax.
    config_root = str(pathlib.Path(config_path(run.command)).parent.parent)
    env['PYTHONPATH'] = os.pathsep.join(
        p for p in (config_root, os.environ.get('PYTHONPATH')) if p
    )
    proc = subprocess.Popen(
        run.command, stdout=log, stderr=subprocess.STDOUT, env=env
    )
    try:
      while proc.poll() is None:
        try:
          proc.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
          progress.update(
              index, run, time.monotonic() - start, progress_detail(run.workdir)
          )
    except KeyboardInterrupt:
      # The child got the same SIGINT; let it checkpoint and exit 4.
      try:
        proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      run.returncode = proc.returncode
      run.status = 'interrupted'
      run.elapsed_s = round(time.monotonic() - start, 1)
      raise
  run.returncode = proc.returncode
  run.elapsed_s = round(time.monotonic() - start, 1)
  run.status = runfiles.STATUS_BY_EXIT.get(proc.returncode, 'failed')
  if (
      run.status in runfiles.FINISHED
      and runfiles.finished_status(run.workdir) is None
  ):
    # Exit code and summary.json disagree; a rerun would redo it, so say so.
    run.status = 'failed'
