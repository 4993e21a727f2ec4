r"""Time to accuracy over a slow link: the training program as two hosts.

``train.py`` runs as two processes of M = 4 CPU devices each (K = 8
workers), each process in its own network namespace, joined by a veth pair
whose ends each send at most ``--rate`` (``bench.netns``): the product as a
user runs it across two hosts, with real data. One short schedule that every
run finishes (CIFAR-10, the slim VGG-16 with batch norm of
``configs/cifar10_vgg16_slim.py``, 2 epochs: the three runs take about an
hour on 2 cores) for SGD and DEF at ratios 256 and 64. Test accuracy is plotted against ``train_time`` (seconds in train
steps, summed across resumes; start-up, compilation, evaluation and
checkpoints left out: ``defjax.trainer``), as in the paper's Figure 1 (left
column).

Beside the measured speedups: what ``bench/netmodel.py`` (the model of
``bench/cluster_projection.py``) predicts for this setting: a ring of K = 8
at the link's rate, with DEF's measured step as the compute time.

The runs live in ``bench/results/slow_link_train/<run>/`` (metrics.jsonl,
summary.json, run.json; checkpoints are not committed). A run that finished
is not run again; an interrupted one resumes from its last checkpoint.

Run: python -m bench.slow_link_train [--rate 100mbit] [--epochs 2]
     [--image-folder /path/to/cifar10-jpeg.tar]   (root, Linux)
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from bench import netns

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / 'bench' / 'results' / 'slow_link_train'
CONFIG = 'configs/cifar10_vgg16_slim.py'
DEVICES_PER_HOST = 4
PORT = 23457
# name -> (method, ratio)
RUNS = {'sgd': ('sgd', 1), 'def@256': ('def', 256), 'def@64': ('def', 64)}
# Accuracies whose first arrival is reported for every run.
THRESHOLDS = (0.30, 0.35, 0.40, 0.50, 0.60)


def command(name: str, host: int, workdir: pathlib.Path, a) -> list[str]:
  method, ratio = RUNS[name]
  data = (
      ['--config.dataset=image_folder', f'--config.data_dir={a.image_folder}']
      if a.image_folder
      else []
  )
  data += [f'--config.num_train_steps={a.steps}'] if a.steps else []
  data += [f'--config.eval_every_steps={a.eval_every}'] if a.eval_every else []
  return [
      sys.executable,
      str(ROOT / 'train.py'),
      '--config',
      CONFIG,
      '--workdir',
      str(workdir),
      f'--config.num_epochs={a.epochs}',
      f'--config.optim.method={method}',
      f'--config.optim.ratio={ratio}',
      *data,
      f'--coordinator_address={netns.ADDRESSES[0]}:{PORT}',
      '--num_processes=2',
      f'--process_id={host}',
  ]


def train(name: str, a) -> dict:
  """Runs (or resumes) one run across the link; returns its summary."""
  workdir = a.out / name
  summary = workdir / 'summary.json'
  if summary.exists():
    print(f'{name}: finished earlier', flush=True)
    return json.loads(summary.read_text())
  workdir.mkdir(parents=True, exist_ok=True)
  env = dict(
      os.environ,
      XLA_FLAGS=' '.join(
          [
              f
              for f in os.environ.get('XLA_FLAGS', '').split()
              if 'xla_force_host_platform_device_count' not in f
          ]
          + [f'--xla_force_host_platform_device_count={DEVICES_PER_HOST}']
      ),
      JAX_PLATFORMS='cpu',
  )
  t0 = time.time()
  with netns.Link(a.rate) as link:
    with open(workdir / 'log.txt', 'a') as log:
      procs = [
          subprocess.Popen(
              link.command(i, command(name, i, workdir, a)),
              cwd=ROOT,
              env=env,
              stdout=log if i == 0 else subprocess.DEVNULL,
              stderr=log if i == 0 else subprocess.DEVNULL,
          )
          for i in range(2)
      ]
      try:
        codes = [p.wait() for p in procs]
      finally:
        for p in procs:
          if p.poll() is None:
            p.kill()
            p.wait()
      sent = link.sent_bytes()
  if any(codes):
    raise RuntimeError(f'{name}: exit codes {codes}; see {workdir / "log.txt"}')
  print(
      f'{name}: {time.time() - t0:.0f}s, {sent[0] / 1e6:.1f} MB / {sent[1] / 1e6:.1f} MB'
      ' sent each way (start-up and evaluation included)',
      flush=True,
  )
  return json.loads(summary.read_text())


def curves(out_dir: pathlib.Path, names) -> dict:
  out = {}
  for name in names:
    rows = [
        json.loads(line)
        for line in (out_dir / name / 'metrics.jsonl').read_text().splitlines()
        if line.strip()
    ]
    out[name] = {
        'train_time_s': [r['train_time'] for r in rows],
        'test_accuracy': [r['test_accuracy'] for r in rows],
        'epoch': [r['epoch'] for r in rows],
        'step': [r['step'] for r in rows],
    }
  return out


def first_reach(curve: dict, accuracy: float):
  """Train time at the first evaluation at or above ``accuracy`` (None if never)."""
  for t, acc in zip(curve['train_time_s'], curve['test_accuracy']):
    if acc >= accuracy:
      return t
  return None


def projection(summaries: dict, rate: str) -> dict:
  """netmodel's step-time speedup of each DEF run over SGD for this setting."""
  from bench import netmodel

  sgd = summaries['sgd']
  d, workers = sgd['num_params'], sgd['config']['num_workers']
  net = netmodel.Network(netns.bits_per_s(rate) / 1e9)
  out = {}
  for name, s in summaries.items():
    if name == 'sgd':
      continue
    compute = s['train_time'] / s['steps']  # DEF's step: its block costs little
    ratio = RUNS[name][1]
    out[name] = {
        'compute_s': compute,
        'predicted_step_speedup': netmodel.speedup(
            compute, d, ratio, workers, net
        ),
        'measured_step_speedup': (
            (sgd['train_time'] / sgd['steps']) / (s['train_time'] / s['steps'])
        ),
    }
  return out


def plot(data: dict, path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for name, c in data.items():
    ax.plot(
        [t / 60 for t in c['train_time_s']],
        [100 * a for a in c['test_accuracy']],
        marker='o',
        label=name.upper().replace('@', ' ratio '),
    )
  ax.set(
      xlabel='training time (minutes; evaluation and start-up excluded)',
      ylabel='test accuracy (%)',
      title=title,
  )
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--rate', default='100mbit')
  p.add_argument('--epochs', type=int, default=2)
  p.add_argument('--runs', default=','.join(RUNS))
  p.add_argument(
      '--steps', type=int, default=0, help='num_train_steps (0: whole epochs)'
  )
  # Three evaluations per epoch of CIFAR-10 at K x B = 128 (390 steps), so
  # that a curve shows when it crosses an accuracy, not only which epoch;
  # evaluation is left out of train_time.
  p.add_argument(
      '--eval-every',
      type=int,
      default=130,
      help='eval_every_steps (0: per epoch)',
  )
  p.add_argument(
      '--out', type=pathlib.Path, default=OUT, help='where the runs go'
  )
  p.add_argument(
      '--image-folder',
      default='',
      help="CIFAR-10 as an image_folder .tar (default: TFDS's cifar10)",
  )
  a = p.parse_args(argv)
  reason = netns.unavailable()
  if reason:
    raise SystemExit(f'slow_link_train: {reason}')
  names = a.runs.split(',')
  summaries = {name: train(name, a) for name in names}
  data = curves(a.out, names)
  from bench import common

  rows = []
  for name in names:
    s, c = summaries[name], data[name]
    row = {
        'run': name,
        'final_accuracy': 100 * s['final_test_accuracy'],
        'train_min': s['train_time'] / 60,
        'step_ms': 1e3 * s['train_time'] / s['steps'],
    }
    for acc in THRESHOLDS:
      t = first_reach(c, acc)
      row[f'min_to_{round(100 * acc)}%'] = t / 60 if t is not None else '—'
    rows.append(row)
  proj = projection(summaries, a.rate) if 'sgd' in summaries else {}
  for row in rows:
    if row['run'] in proj:
      row.update(proj[row['run']])
  png = common.RESULTS / 'slow_link_train.png'
  title = (
      f'CIFAR-10, slim VGG-16, K = 8 (2 hosts x {DEVICES_PER_HOST}), {a.rate}/s link,'
      f' {a.epochs} epochs'
  )
  plot(data, png, title)
  columns = (
      'run',
      'final_accuracy',
      'train_min',
      'step_ms',
      *(f'min_to_{round(100 * acc)}%' for acc in THRESHOLDS),
      'measured_step_speedup',
      'predicted_step_speedup',
  )
  notes = (
      f'{title}. train.py as two hosts (bench.netns), {CONFIG} with num_epochs={a.epochs};'
      ' min_to_X%: training minutes (train_time: steps only, summed over resumes) at the first'
      f' evaluation ({f"every {a.eval_every} steps" if a.eval_every else "one per epoch"}) at or'
      ' above X% test accuracy; step_ms: train_time / steps;'
      " predicted_step_speedup: bench/netmodel.py for a ring of 8 at this rate with the run's"
      ' own step as the compute time. Plot: ' + png.name + '.'
  )
  common.write(
      'slow_link_train',
      {
          'summaries': summaries,
          'curves': data,
          'projection': proj,
          'rows': rows,
          'plot': png.name,
      },
      common.table(rows, columns),
      notes,
  )


if __name__ == '__main__':
  main()
