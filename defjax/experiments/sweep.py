r"""Run a grid of methods x ratios x seeds (x lam) from one base config.

Each run is one ``python -m defjax.main`` subprocess with its own workdir, so
a sweep is resumable at two levels: a run whose ``summary.json`` exists
(completed or diverged) is skipped, and an unfinished one is relaunched with
the same command, which makes the program resume from its own checkpoint.
Runs are launched one after another (``launch``): on a machine with
few cores parallel runs would only share them.

Usage::

  python -m defjax.sweep --config configs/fashion_mnist.py \
      --out runs/sweep-fm --methods sgd,ef,def,saef,psync \
      --ratios 16,64,256,1024 --seeds 0,1,2 [--lams 0.2,0.3,0.6] \
      [--set num_epochs=5 --set optim.lr=0.05 ...] [--train SCRIPT] \
      [--dry-run]

Workdirs are ``<out>/<method>-r<ratio>[-lam<lam>]-s<seed>``. SGD does not
compress, so it runs once per seed at ratio 1. ``lam`` only changes DEF and
DEF-A (EF is lam = 0 and SAEF lam = 1 by definition), so only those methods
are repeated over ``--lams``; without ``--lams`` the config's own lam is used
and the name has no lam part. A def run yields both the DEF and the DEF-A
result (see ``results``), so ``def_a`` rarely needs its own runs.

``<out>/sweep.json`` records the command line, the date, the machine, the
package versions and every run's command and status; it is rewritten after
each run, so it is current even when the sweep is interrupted. Grids that
share an ``--out`` keep each other's runs there (``earlier_commands`` lists
the other grids' command lines). The exit code
is 0 when every run completed or diverged (divergence is a result), 1 when a
run failed, 130 when the sweep was interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import shlex
import sys
from collections.abc import Sequence

from defjax import methods as methods_lib
from defjax.experiments import launch
from defjax.training import runfiles
from defjax.training.runfiles import FINISHED
from defjax.training.runfiles import finished_status


def _absolute_config(config: str) -> str:
  # config_flags accepts ``path.py:override``; only the path part is a file.
  path, sep, rest = config.partition(':')
  return str(pathlib.Path(path).resolve()) + sep + rest


def expand_grid(
    *,
    config: str,
    out: str | os.PathLike[str],
    methods: Sequence[str],
    ratios: Sequence[int],
    seeds: Sequence[int],
    lams: Sequence[float] | None = None,
    overrides: Sequence[str] = (),
    train: str | os.PathLike[str] | None = None,
    python: str = sys.executable,
) -> list[launch.Job]:
  """Lists the runs of a sweep, in launch order, with their commands.

  Args:
    config: the base config file given to the program's ``--config``.
    out: the sweep directory; each run gets a workdir below it.
    methods: names from ``defjax.methods.NAMES``.
    ratios: compression ratios; SGD ignores them and runs at ratio 1.
    seeds: one run per seed for every (method, ratio, lam).
    lams: lam values for DEF and DEF-A; None keeps the config's lam.
    overrides: ``key=value`` config overrides shared by all runs, e.g.
      ``num_epochs=5`` (a leading ``config.`` is accepted).
    train: a training script to run instead of ``python -m defjax.main``
      (it takes the same flags).
    python: the interpreter that runs the program.

  Returns:
    The runs, seed-major so that a partial sweep already covers the whole grid
    once before it repeats it with more seeds. Duplicates are dropped.

  Raises:
    ValueError: on an unknown method, a ratio below 1 or a malformed override.
  """
  unknown = [m for m in methods if m not in methods_lib.NAMES]
  if unknown:
    raise ValueError(
        f'unknown methods {unknown}; known: {", ".join(methods_lib.NAMES)}'
    )
  if any(r < 1 for r in ratios):
    raise ValueError(f'ratios must be >= 1, got {list(ratios)}')
  sets = []
  for item in overrides:
    key, eq, value = item.partition('=')
    key = key.strip().removeprefix('--').removeprefix('config.')
    if not eq or not key:
      raise ValueError(f'--set expects key=value, got {item!r}')
    sets.append(f'--config.{key}={value}')
  out = pathlib.Path(out).resolve()
  program = (
      [python, '-m', 'defjax.main']
      if train is None
      else [python, str(pathlib.Path(train).resolve())]
  )
  base = program + ['--config', _absolute_config(config)]

  runs, seen = [], set()
  for seed in seeds:
    for method in methods:
      method_ratios = ratios if methods_lib.get(method).compresses else [1]
      method_lams = (
          lams if (lams and method in methods_lib.LAM_NAMES) else [None]
      )
      for ratio in method_ratios:
        for lam in method_lams:
          name = runfiles.run_name(method, ratio, lam, seed)
          if name in seen:
            continue
          seen.add(name)
          workdir = out / name
          command = base + [
              '--workdir',
              str(workdir),
              f'--config.optim.method={method}',
              f'--config.optim.ratio={ratio}',
              f'--config.seed={seed}',
          ]
          if lam is not None:
            command.append(f'--config.optim.lam={lam:g}')
          # Shared overrides come last; they cannot silently undo the grid
          # because a grid key given twice is the user's explicit choice.
          command += sets
          runs.append(
              launch.Job(method, ratio, lam, seed, name, workdir, command)
          )
  return runs


def _config_dir(runs: list[launch.Job]) -> str | None:
  return (
      str(pathlib.Path(launch.config_path(runs[0].command)).parent)
      if runs
      else None
  )


def _write_record(
    path: pathlib.Path,
    header: dict,
    runs: list[launch.Job],
    previous: dict | None,
    todo: set[str],
) -> None:
  # Several grids may share one --out (a queue adds a second seed later): keep
  # the other grids' runs and commands instead of forgetting them. A run this
  # sweep skips (finished earlier) keeps the entry of the sweep that ran it:
  # its command, exit code and time.
  previous = previous or {}
  names = {r.name for r in runs}
  kept = [r for r in previous.get('runs', []) if r.get('name') not in names]
  before = {r.get('name'): r for r in previous.get('runs', [])}
  earlier = list(previous.get('earlier_commands', []))
  if (
      kept
      and previous.get('command')
      and previous['command'] != header['command']
  ):
    earlier.append(previous['command'])
  entries = [
      dict(before[r.name], status=r.status)
      if r.name not in todo and r.name in before
      else r.record()
      for r in runs
  ]
  record = dict(header, runs=entries + kept)
  if earlier:
    record['earlier_commands'] = list(dict.fromkeys(earlier))
  tmp = path.with_suffix('.json.tmp')
  tmp.write_text(json.dumps(record, indent=2) + '\n')
  tmp.replace(path)  # never leave a half-written sweep.json behind


def run_sweep(
    runs: list[launch.Job],
    out: str | os.PathLike[str],
    *,
    argv: Sequence[str] = (),
    dry_run: bool = False,
    poll_s: float = 1.0,
    stream=None,
) -> int:
  """Launches the unfinished runs one by one and records the sweep.

  Args:
    runs: from ``expand_grid``.
    out: the sweep directory, where ``sweep.json`` is written.
    argv: the command line to record.
    dry_run: print the commands of the unfinished runs; launch and write
      nothing.
    poll_s: how often the progress line is refreshed.
    stream: where progress goes (default: sys.stdout at call time).

  Returns:
    The exit code: 0 if every run completed or diverged, 1 if any failed, 130
    if the sweep was interrupted.
  """
  out = pathlib.Path(out)
  stream = stream or sys.stdout
  progress = launch.StatusLines(len(runs), stream)
  todo = []
  for run in runs:
    status = finished_status(run.workdir)
    if status is not None:
      run.status = status
    else:
      todo.append(run)
  print(
      f'{len(runs)} runs, {len(runs) - len(todo)} finished, '
      f'{len(todo)} to run',
      file=stream,
      flush=True,
  )
  if dry_run:
    for run in todo:
      print(shlex.join(run.command), file=stream)
    return 0

  record_path = out / 'sweep.json'
  previous = _warn_if_base_changed(record_path, runs, stream)
  if not todo:
    # Nothing to launch: leave sweep.json as the launching sweep wrote it.
    for index, run in enumerate(runs, start=1):
      progress.done(index, run, 'finished earlier, skipped')
    _print_counts(runs, stream)
    return 0

  out.mkdir(parents=True, exist_ok=True)
  header = {
      'command': shlex.join(argv),
      'cwd': os.getcwd(),
      'date': (
          datetime.datetime.now().astimezone().isoformat(timespec='seconds')
      ),
      **runfiles.environment(_config_dir(runs)),
  }
  todo_names = {r.name for r in todo}
  _write_record(record_path, header, runs, previous, todo_names)
  for index, run in enumerate(runs, start=1):
    if run.name not in todo_names:
      progress.done(index, run, 'finished earlier, skipped')
      continue
    try:
      launch.launch(run, index, progress, poll_s)
    except KeyboardInterrupt:
      progress.done(index, run)
      _write_record(record_path, header, runs, previous, todo_names)
      print(
          'sweep interrupted; rerun the same command to resume',
          file=stream,
          flush=True,
      )
      return 130
    detail = (
        f'exit code {run.returncode}, see {run.workdir / "log.txt"}'
        if run.status not in FINISHED
        else launch.progress_detail(run.workdir)
    )
    progress.done(index, run, detail)
    _write_record(record_path, header, runs, previous, todo_names)

  _print_counts(runs, stream)
  return 1 if any(r.status not in FINISHED for r in runs) else 0


def _print_counts(runs: list[launch.Job], stream) -> None:
  counts = {}
  for run in runs:
    counts[run.status] = counts.get(run.status, 0) + 1
  print(
      'done: ' + ', '.join(f'{n} {s}' for s, n in sorted(counts.items())),
      file=stream,
      flush=True,
  )


def _warn_if_base_changed(
    record_path: pathlib.Path, runs: list[launch.Job], stream
) -> dict | None:
  """Warns about runs whose command changed; returns the previous record."""
  # A workdir is recognised by its name only, so resuming into an --out made
  # with another base config or --set would mix results without a word.
  try:
    previous = json.loads(record_path.read_text())
  except (OSError, ValueError):
    return None
  old = {r['name']: r['command'] for r in previous.get('runs', [])}
  changed = [
      r.name
      for r in runs
      if r.name in old and old[r.name] != shlex.join(r.command)
  ]
  if changed:
    print(
        f'warning: {len(changed)} runs (e.g. {changed[0]}) had a different '
        f'command in the previous {record_path}; finished ones are kept '
        'as they are. Use a new --out for a new base config.',
        file=stream,
        flush=True,
    )
  return previous


def _int_list(text: str) -> list[int]:
  return [int(x) for x in text.split(',') if x.strip()]


def _float_list(text: str) -> list[float]:
  return [float(x) for x in text.split(',') if x.strip()]


def _str_list(text: str) -> list[str]:
  return [x.strip() for x in text.split(',') if x.strip()]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m defjax.sweep',
      description='Run a grid of methods x ratios x seeds (x lam) of the '
      'training program, one workdir per run, skipping finished runs.',
  )
  parser.add_argument(
      '--config',
      required=True,
      help='base config file, as for train.py --config',
  )
  parser.add_argument(
      '--out',
      required=True,
      help='sweep directory; one workdir per run below it',
  )
  parser.add_argument(
      '--methods',
      type=_str_list,
      required=True,
      help=f'comma-separated, from {",".join(methods_lib.NAMES)}',
  )
  parser.add_argument(
      '--ratios',
      type=_int_list,
      default=[1],
      help='comma-separated compression ratios (SGD uses 1)',
  )
  parser.add_argument(
      '--seeds', type=_int_list, default=[0], help='comma-separated seeds'
  )
  parser.add_argument(
      '--lams',
      type=_float_list,
      default=None,
      help='comma-separated lam values for def and def_a '
      "(default: the config's lam)",
  )
  parser.add_argument(
      '--set',
      dest='overrides',
      action='append',
      default=[],
      metavar='KEY=VALUE',
      help='config override for every run, e.g. ' 'num_epochs=5 (repeatable)',
  )
  parser.add_argument(
      '--train',
      default=None,
      help='a training script taking the same flags, run '
      'instead of python -m defjax.main',
  )
  parser.add_argument(
      '--dry-run',
      action='store_true',
      help='print the commands of unfinished runs and exit',
  )
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  """The command line entry point; returns the exit code."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.train is not None and not pathlib.Path(args.train).is_file():
    print(f'error: no training script at {args.train}', file=sys.stderr)
    return 2
  config_path = args.config.partition(':')[0]
  if not pathlib.Path(config_path).is_file():
    print(f'error: no config file at {config_path}', file=sys.stderr)
    return 2
  try:
    runs = expand_grid(
        config=args.config,
        out=args.out,
        methods=args.methods,
        ratios=args.ratios,
        seeds=args.seeds,
        lams=args.lams,
        overrides=args.overrides,
        train=args.train,
    )
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  argv_record = [
      'python',
      '-m',
      'defjax.sweep',
      *(sys.argv[1:] if argv is None else argv),
  ]
  return run_sweep(runs, args.out, argv=argv_record, dry_run=args.dry_run)


if __name__ == '__main__':
  sys.exit(main())
