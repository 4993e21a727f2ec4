"""The host allocator under XLA:CPU: glibc's malloc against tcmalloc.

XLA:CPU allocates every output and temporary buffer of a compiled call anew.
glibc's malloc serves a request above its mmap threshold (at most 32 MB) with
a fresh mmap and hands it back to the kernel on free, so each 4 KB page of a
large buffer faults when it is first written, on every call: about 14,600
minor faults per d-float buffer of a 15M-parameter model. tcmalloc keeps
freed pages for the next request. PyTorch works in place and pays neither.

Each round runs every part once under each allocator (fresh processes, glibc
first, then tcmalloc with LD_PRELOAD):

* ``train step``: ``DataParallelLayout.train_step`` on 8 CPU devices in one
  process, SGD and DEF (ratio 256, per-leaf, lam 0.3): the CNN (d = 0.42M,
  batch 16 per worker) and VGG-16 (d = 15M, batch 4);
* ``2 processes``: ``bench.collectives``' optimizer + communication step of
  the 15M-parameter MLP (K = 2, gloo, one core each) and its bare all-reduce
  of d floats, next to ``bench.peer_torch``'s PyTorch reference of the same
  step under the same allocator (when PyTorch is installed).

ms: median over rounds of each part's own median; x_glibc: tcmalloc's time
over glibc's in the same round (median); minflt: minor page faults per call
(per step), median; defjax_vs_torch: defjax's time over PyTorch's under the
same allocator in the same round (median). The train programs' results are
the same bits under either allocator.

Needs tcmalloc (Debian/Ubuntu: ``apt install libtcmalloc-minimal4``).
Run: python -m bench.allocator [--rounds 3] [--parts train,procs]
"""

from __future__ import annotations

from bench import common  # noqa: F401  (sets 8 host devices before jax)

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from bench import procs  # noqa: E402
from defjax.training import main  # noqa: E402

# (model, per-worker batch, steps per timed sample)
TRAIN_SETTINGS = (('cnn', 16, 3), ('vgg16', 4, 1))
RATIO = 256


def allocators() -> dict[str, dict]:
  """Environment of each allocator's processes (no preload: the C library's)."""
  lib = main.tcmalloc_library()
  return {
      'glibc': {'LD_PRELOAD': ''},
      **({'tcmalloc': {'LD_PRELOAD': lib}} if lib else {}),
  }


def train_child(out_path: str) -> None:
  """One process, 8 devices: SGD and DEF train steps of each model, timed in
  alternation, with page faults per step and the final params' bytes."""
  import hashlib

  import jax
  import numpy as np

  import defjax
  from defjax import layouts

  out = {}
  for model, batch, steps in TRAIN_SETTINGS:
    setup = common.Setup(model, 8, batch)
    data = setup.batches(2)
    runners, digest = {}, {}
    for method in ('sgd', 'def'):
      compressor = (
          None if method == 'sgd' else defjax.rbgs(RATIO, per_leaf=True)
      )
      tx = common.make_tx(
          method, RATIO, setup.layout.axis_name, compressor=compressor
      )
      params, model_state = setup.variables()
      opt_state = setup.layout.init_state(tx, params)
      state = [params, model_state, opt_state]
      step = setup.step(tx).lower(*state, data[0]).compile()
      runners[method] = common.step_runner(step, state, data, steps)
      runners[
          method
      ]()  # 'steps' steps from the same start under each allocator
      digest[method] = hashlib.sha256(
          b''.join(
              np.asarray(layouts.host_value(x)).tobytes()
              for x in jax.tree.leaves(state[0])
          )
      ).hexdigest()
    runners, faults = common.count_faults(runners)
    res = common.alternate(runners, rounds=3, baseline='sgd', warmup=1)
    out[model] = {
        m: {
            'step_s': res['times_s'][m]['median'] / steps,
            'minflt': common.summarize(faults[m][1:])['median'] / steps,
            'params_sha256': digest[m],
        }
        for m in runners
    }
  with open(out_path, 'w') as f:
    json.dump(out, f)


def run_train_child(env: dict) -> dict:
  fd, path = tempfile.mkstemp(suffix='.json')
  os.close(fd)
  try:
    subprocess.run(
        [sys.executable, '-m', 'bench.allocator', '--child', path],
        check=True,
        cwd=procs.ROOT,
        env=dict(os.environ, **env),
        timeout=900,
    )
    with open(path) as f:
      return json.load(f)
  finally:
    os.remove(path)


def procs_round(env: dict) -> dict:
  """defjax's and PyTorch's optimizer + communication step, 2 processes."""
  from bench import collectives, peer_torch

  jx = collectives.launch('mlp', [RATIO], env=env)
  out = {
      'defjax': {
          n: {'step_s': s['median'], 'minflt': jx['opt_minflt'][n]['median']}
          for n, s in jx['opt_step_s'].items()
      }
  }
  if peer_torch.torch_available():
    pt = peer_torch.launch([RATIO], env=env)['times']
    out['torch'] = {
        n: {
            'step_s': common.summarize(s['opt'])['median'],
            'minflt': common.summarize(s['opt_minflt'])['median'],
        }
        for n, s in pt.items()
    }
  return out


def rows_of(rounds: list[dict]) -> list[dict]:
  """One row per (part, program, variant, allocator) from the per-round results."""
  import statistics

  def cells(get):
    # {allocator: [value of each round]} for one (part, program, variant)
    return {a: [get(r[a]) for r in rounds if a in r] for a in rounds[0]}

  keys = []
  first = rounds[0]['glibc']
  for model, variants in first.get('train', {}).items():
    keys += [
        (
            'train step',
            f'{model} (8 devices)',
            v,
            lambda x, m=model, v=v: x['train'][m][v],
        )
        for v in variants
    ]
  for prog, variants in first.get('procs', {}).items():
    keys += [
        (
            '2 processes',
            f'{prog} mlp',
            v,
            lambda x, p=prog, v=v: x['procs'][p][v],
        )
        for v in variants
    ]
  rows = []
  for part, program, variant, get in keys:
    c = cells(get)
    for alloc, vals in c.items():
      if not vals:
        continue
      row = {
          'part': part,
          'program': program,
          'variant': variant,
          'allocator': alloc,
          'ms': 1e3 * statistics.median(v['step_s'] for v in vals),
          'x_glibc': statistics.median(
              v['step_s'] / g['step_s'] for v, g in zip(vals, c['glibc'])
          ),
          'minflt': statistics.median(v['minflt'] for v in vals),
      }
      if program == 'defjax mlp' and all(
          'torch' in r[alloc]['procs'] for r in rounds
      ):
        row['defjax_vs_torch'] = statistics.median(
            r[alloc]['procs']['defjax'][variant]['step_s']
            / r[alloc]['procs']['torch'][variant]['step_s']
            for r in rounds
        )
      if 'params_sha256' in vals[0] and alloc != 'glibc':
        row['same_bits'] = all(
            v['params_sha256'] == g['params_sha256']
            for v, g in zip(vals, c['glibc'])
        )
      rows.append(row)
  return rows


COLUMNS = (
    'part',
    'program',
    'variant',
    'allocator',
    'ms',
    'x_glibc',
    'minflt',
    'defjax_vs_torch',
    'same_bits',
)
NOTES = (
    '{rounds} rounds; each part runs in fresh processes under each allocator in turn;'
    ' tcmalloc = LD_PRELOAD={lib}. ms: median over rounds (per step or call); x_glibc: over'
    ' glibc in the same round; minflt: minor page faults per step or call; defjax_vs_torch:'
    ' defjax / PyTorch optimizer + communication under the same allocator in the same round;'
    " same_bits: the train step's params equal glibc's bit for bit."
)


def main(argv=None):
  if argv is None:
    argv = sys.argv[1:]
  if argv[:1] == ['--child']:
    train_child(argv[1])
    return None
  a = common.arguments(__doc__, argv, rounds=3, parts='train,procs')
  allocs = allocators()
  if len(allocs) < 2:
    print(
        'allocator: tcmalloc is not installed (apt install libtcmalloc-minimal4); skipped.'
    )
    return None
  parts = a.parts.split(',')
  rounds = []
  for r in range(a.rounds):
    result = {}
    for name, env in allocs.items():
      result[name] = {}
      if 'train' in parts:
        result[name]['train'] = run_train_child(env)
      if 'procs' in parts:
        result[name]['procs'] = procs_round(env)
      print(f'round {r + 1}/{a.rounds}: {name} done', flush=True)
    rounds.append(result)
  rows = rows_of(rounds)
  notes = NOTES.format(rounds=a.rounds, lib=allocs['tcmalloc']['LD_PRELOAD'])
  common.write(
      'allocator',
      {'rounds': rounds, 'rows': rows},
      common.table(rows, COLUMNS),
      notes,
  )
  return rows


if __name__ == '__main__':
  main()
