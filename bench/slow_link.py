r"""Train steps over a real slow link: two hosts on this machine (``bench.netns``).

Two processes joined by ``jax.distributed``, each with M CPU devices and in
its own network namespace; the namespaces are joined by a veth pair whose
ends each send at most ``rate`` (a token bucket; unthrottled: a plain FIFO).
Traffic between the devices of one process stays on its own loopback; only
traffic between the processes crosses the link. K = 2M workers on the 1-D
layout, one per device, run whole train steps (gradient, optimizer and the
all-reduce: the dense gradient for SGD, the per-leaf RBGS blocks for DEF and
EF) on random data.

Each round visits every rate (rotated from round to round) and, at each
rate, every variant (rotated too), so the ratio between two rates or two
variants is measured within one round; medians over rounds, with min and
max. ``link_added`` is a variant's step time at a rate minus its unthrottled
step time in the same round: the time the link adds to a step, the measure
that compares compression across frameworks (whose own compute differs).

Bytes on the link are the qdisc's counters (every TCP segment with its
headers) around each variant's timed steps, minus the idle traffic (the
coordination service's heartbeats) measured the same way while the workers
sleep. They are compared with a formula written before measuring:

  each all-reduce of n bytes per rank is gloo's ring over the P = 2M ranks
  (XLA:CPU's only all-reduce algorithm), whose ranks are the devices in
  global order (process 0's M, then process 1's), so exactly one ring edge
  crosses the link in each direction, carrying 2 (P - 1) / P n bytes of
  payload; on the wire, one 66-byte header per 1448-byte segment
  (``netns.wire_bytes``). n is read from the compiled step's HLO.

``bench.slow_link_torch`` runs PyTorch DDP and its compression hooks on the
same link with the same rounds (``time_rounds``).

Run: python -m bench.slow_link [--settings ...] [--frameworks jax,torch] [--report-only]
     (or make bench-link; root, Linux)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

from bench import netns
from bench import procs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNTHROTTLED = 'none'
# How long the workers sleep at each rate to measure the link's idle traffic.
IDLE_S = 2.0
PORT = 23456


def rate_arg(rate: str) -> Optional[str]:
  return None if rate == UNTHROTTLED else rate


def rotated(items: Sequence, r: int) -> list:
  r %= len(items)
  return list(items[r:]) + list(items[:r])


def time_rounds(
    runners: dict[str, Callable[[], None]],
    *,
    rates: Sequence[str],
    rounds: int,
    steps: int,
    dev: str,
    barrier: Callable[[str], None],
    log: Callable[[str], None] = lambda s: None,
) -> dict:
  """Times ``steps`` calls of each runner at each rate, in alternating rounds.

  Each runner runs one step and blocks until it is done. Both workers call
  this with the same arguments (their own end of the link as ``dev``) and
  meet at ``barrier`` before each timed unit; each sets its own end's rate.
  Every runner runs once untimed first (compilation, warm caches).

  Returns {'step_s': {rate: {name: [seconds per step, per round]}},
  'sent': {rate: {name: [bytes this end sent per step, per round]}},
  'retransmitted_segments': (the same, TCP segments this host sent again),
  'idle_bytes_per_s': {rate: [per round]}}. Retransmissions are counted in
  ``sent`` (they crossed the wire) and reported beside it: unthrottled, the
  veth reorders packets now and then and TCP resends some spuriously.
  """
  names = list(runners)
  netns.set_rate(dev, None)
  barrier('warmup')
  for name in names:
    runners[name]()
    barrier(f'warm {name}')
  step_s = {rate: {n: [] for n in names} for rate in rates}
  sent = {rate: {n: [] for n in names} for rate in rates}
  resent = {rate: {n: [] for n in names} for rate in rates}
  idle = {rate: [] for rate in rates}
  for r in range(rounds):
    for rate in rotated(rates, r):
      netns.set_rate(dev, rate_arg(rate))
      barrier(f'rate {rate} {r}')
      b0, t0 = netns.sent_bytes(dev), time.perf_counter()
      time.sleep(IDLE_S)
      idle[rate].append(
          (netns.sent_bytes(dev) - b0) / (time.perf_counter() - t0)
      )
      for name in rotated(names, r):
        barrier(f'{name} {rate} {r}')
        b0, t0, re0 = (
            netns.sent_bytes(dev),
            time.perf_counter(),
            netns.retransmitted(),
        )
        for _ in range(steps):
          runners[name]()
        elapsed = time.perf_counter() - t0
        # Once the peer is past this barrier it has received everything this
        # end sent, so no tail is left in the bucket for the next unit.
        barrier(f'done {name} {rate} {r}')
        b1, counted = netns.sent_bytes(dev), time.perf_counter() - t0
        step_s[rate][name].append(elapsed / steps)
        sent[rate][name].append((b1 - b0 - idle[rate][-1] * counted) / steps)
        resent[rate][name].append((netns.retransmitted() - re0) / steps)
        log(
            f'round {r} {rate} {name}: {1e3 * elapsed / steps:.0f} ms/step,'
            f' {(b1 - b0) / steps / 1e6:.2f} MB/step sent'
        )
  netns.set_rate(dev, None)
  return {
      'step_s': step_s,
      'sent': sent,
      'retransmitted_segments': resent,
      'idle_bytes_per_s': idle,
  }


# --------------------------------------------------------------- jax worker

VARIANTS = ('sgd', 'def@64', 'def@256', 'def@1024', 'ef@256')
# model -> per-worker batch
BATCH = {'vgg16': 4, 'vgg16_slim': 16}


def ring_link_bytes(n: int, ranks: int) -> float:
  """Payload bytes one direction of the link carries for a ring all-reduce
  of ``n`` bytes per rank over ``ranks`` ranks, when one ring edge crosses it.
  """
  return 2 * (ranks - 1) / ranks * n if ranks > 1 else 0.0


def crossing_all_reduces(compiled, mesh) -> list[tuple[int, int, int]]:
  """(n bytes per rank, ranks P, ring edges from process 0 to process 1) of
  every gloo all-reduce of a compiled step whose ring crosses the link: one
  per operand of each HLO all-reduce (XLA:CPU runs a combined all-reduce
  operand by operand) and per replica group spanning both processes. A group
  of P ranks is a ring in its devices' global order."""
  from defjax import wire

  devices = list(mesh.devices.flat)
  out = []
  for line in compiled.as_text().splitlines():
    found = wire.collectives(line)
    if not found or found[0].op != 'all-reduce':
      continue
    for group in wire.replica_groups(line, len(devices)):
      procs = [devices[i].process_index for i in sorted(group)]
      edges = sum(
          a == 0 and b == 1 for a, b in zip(procs, procs[1:] + procs[:1])
      )
      if edges:
        out += [(n, len(group), edges) for n in found[0].operand_bytes]
  return out


def jax_worker(a) -> None:
  import jax

  jax.config.update('jax_platforms', 'cpu')
  jax.distributed.initialize(a.coordinator, num_processes=2, process_id=a.rank)
  from jax.experimental import multihost_utils
  import numpy as np

  from bench import common
  import defjax
  from defjax.layouts import hosts

  if a.layout == 'hosts':  # 2 workers: a host of M devices each
    lay = hosts.make_layout(2, a.devices)
    setup = common.Setup(a.model, 2, a.batch * a.devices, layout=lay)
  else:  # 2 M workers, one per device
    setup = common.Setup(a.model, 2 * a.devices, a.batch)
    lay = setup.layout
  rows = lay.worker_rows()
  n_local = rows.stop - rows.start

  def replicated(tree):
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            lay.replicated, np.asarray(x), x.shape
        ),
        tree,
    )

  x0 = np.zeros((1, *setup.input_shape), np.float32)
  v = jax.jit(
      lambda: setup.model.init(jax.random.PRNGKey(0), x0, train=False),
      out_shardings=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]),
  )()
  v = jax.tree.map(np.asarray, v)
  rng = np.random.default_rng(a.rank)
  data = []
  for _ in range(2):
    x = rng.normal(size=(n_local, setup.batch, *setup.input_shape)).astype(
        np.float32
    )
    y = rng.integers(0, setup.classes, size=(n_local, setup.batch)).astype(
        np.int32
    )
    data.append((lay.global_batch(x), lay.global_batch(y)))

  runners, crossing = {}, {}
  for name in a.variants.split(','):
    method, _, ratio = name.partition('@')
    ratio = int(ratio or 1)
    tx = common.make_tx(
        method,
        ratio,
        lay.axis_name,
        compressor=defjax.rbgs(ratio, per_leaf=True) if ratio > 1 else None,
    )
    params = replicated(v['params'])
    ms = replicated({key: w for key, w in v.items() if key != 'params'})
    opt = lay.init_state(tx, params)
    step = setup.step(tx).lower(params, ms, opt, data[0]).compile()
    crossing[name] = crossing_all_reduces(step, lay.mesh)
    runners[name] = common.step_runner(step, [params, ms, opt], data, 1)
    del params, ms, opt

  # Gloo builds each device group's connections at its first collective and
  # gives up after 30 s: a process still compiling (a loaded machine) would
  # fail the other's. Meet at the coordination service first, which waits.
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  distributed.global_state.client.wait_at_barrier(
      'slow_link_compiled', 30 * 60 * 1000
  )
  barrier = lambda tag: multihost_utils.sync_global_devices(tag)
  log = (lambda s: print(s, flush=True)) if a.rank == 0 else (lambda s: None)
  res = time_rounds(
      runners,
      rates=a.rates.split(','),
      rounds=a.rounds,
      steps=a.steps,
      dev=a.dev,
      barrier=barrier,
      log=log,
  )
  res.update(
      framework='jax',
      model=a.model,
      d=setup.num_params,
      layout=a.layout,
      devices_per_host=a.devices,
      workers=lay.num_workers,
      batch_per_worker=setup.batch,
      crossing_all_reduces=crossing,
      allreduce_bytes={n: [b for b, _, _ in c] for n, c in crossing.items()},
      allreduce_operands={n: len(c) for n, c in crossing.items()},
      crossing_messages={
          n: sum(e * 2 * (p - 1) for _, p, e in c) for n, c in crossing.items()
      },
      formula_payload_bytes={
          n: sum(e * ring_link_bytes(b, p) for b, p, e in c)
          for n, c in crossing.items()
      },
      collectives_impl=jax.config.jax_cpu_collectives_implementation,
      jax=jax.__version__,
  )
  with open(f'{a.out}.{a.rank}', 'w') as f:
    json.dump(res, f)
  jax.distributed.shutdown()


# ------------------------------------------------------------------- parent


def run_on_link(
    module: str,
    worker_args: Sequence[str],
    *,
    devices: int = 1,
    timeout_s: float = 3600,
    env: Optional[dict] = None,
) -> list[dict]:
  """Starts ``python -m module *worker_args`` as two hosts on a fresh
  ``netns.Link`` (host i with ``--rank i --dev <its end> --coordinator
  <host 0>:PORT --out FILE``) and returns both workers' JSON (FILE.i)."""
  reason = netns.unavailable()
  if reason:
    raise RuntimeError(f'slow link: {reason}')
  fd, out = tempfile.mkstemp(suffix='.json')
  os.close(fd)
  full_env = dict(os.environ, **(env or {}))
  full_env['PYTHONPATH'] = ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')
  # M devices per process: the parent's 8-device flag must not leak in.
  full_env['XLA_FLAGS'] = ' '.join(
      [
          f
          for f in full_env.get('XLA_FLAGS', '').split()
          if 'xla_force_host_platform_device_count' not in f
      ]
      + [f'--xla_force_host_platform_device_count={devices}']
  )
  full_env['JAX_PLATFORMS'] = 'cpu'
  with netns.Link() as link:
    procs = [
        subprocess.Popen(
            link.command(
                i,
                [
                    sys.executable,
                    '-m',
                    module,
                    *worker_args,
                    '--rank',
                    str(i),
                    '--dev',
                    link.devices[i],
                    '--coordinator',
                    f'{netns.ADDRESSES[0]}:{PORT}',
                    '--out',
                    out,
                ],
            ),
            env=full_env,
            cwd=ROOT,
        )
        for i in range(2)
    ]
    deadline = time.time() + timeout_s
    try:
      for i, p in enumerate(procs):
        rc = p.wait(timeout=max(1, deadline - time.time()))
        if rc != 0:
          raise RuntimeError(f'{module} worker {i} exited with {rc}')
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
  try:
    results = []
    for i in range(2):
      with open(f'{out}.{i}') as f:
        results.append(json.load(f))
    return results
  finally:
    for path in (out, f'{out}.0', f'{out}.1'):
      if os.path.exists(path):
        os.remove(path)


def worker_parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      description=description,
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument('--model', default='vgg16')
  p.add_argument(
      '--devices', type=int, default=1, help='CPU devices per host (M)'
  )
  p.add_argument('--batch', type=int, default=None, help='per-worker batch')
  p.add_argument('--variants', default=','.join(VARIANTS))
  p.add_argument('--rates', default=f'{UNTHROTTLED},1gbit,100mbit')
  p.add_argument(
      '--layout',
      default='data_parallel',
      choices=('data_parallel', 'hosts'),
      help='K = 2M workers of one device, or 2 hosts of M devices',
  )
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--steps', type=int, default=2)
  for name in ('--rank', '--dev', '--coordinator', '--out'):
    p.add_argument(name, default=None, help=argparse.SUPPRESS)
  return p


def summarize(values: Sequence[float]) -> dict:
  v = sorted(values)
  return {
      'median': statistics.median(v),
      'min': v[0],
      'max': v[-1],
      'n': len(v),
  }


def rows_of(results: list[dict], setting: str) -> list[dict]:
  """One row per (rate, variant): step time, the link's share, speedup, bytes."""
  w0, w1 = results
  rows = []
  rates = list(w0['step_s'])
  base = w0['step_s'].get(UNTHROTTLED)
  sgd = next((n for n in w0['step_s'][rates[0]] if n in ('sgd', 'ddp')), None)
  for rate in rates:
    for name, times in w0['step_s'][rate].items():
      row = {
          'setting': setting,
          'rate': rate,
          'variant': name,
          'step_ms': 1e3 * statistics.median(times),
          'step_ms_min': 1e3 * min(times),
          'step_ms_max': 1e3 * max(times),
      }
      if base is not None:
        added = [1e3 * (t - u) for t, u in zip(times, base[name])]
        row['link_added_ms'] = statistics.median(added)
        row['vs_unthrottled'] = statistics.median(
            t / u for t, u in zip(times, base[name])
        )
      if sgd and name != sgd:
        per_round = [s / t for s, t in zip(w0['step_s'][rate][sgd], times)]
        row.update(
            speedup=statistics.median(per_round),
            speedup_min=min(per_round),
            speedup_max=max(per_round),
        )
      sent = [statistics.median(w['sent'][rate][name]) for w in results]
      row['link_MB_0to1'], row['link_MB_1to0'] = sent[0] / 1e6, sent[1] / 1e6
      formula = netns.wire_bytes(w0['formula_payload_bytes'][name])
      row['formula_MB'] = formula / 1e6
      row['measured_vs_formula'] = (
          max(sent) / formula if formula else float('nan')
      )
      rows.append(row)
  return rows


COLUMNS = (
    'setting',
    'rate',
    'variant',
    'step_ms',
    'link_added_ms',
    'vs_unthrottled',
    'speedup',
    'link_MB_0to1',
    'link_MB_1to0',
    'formula_MB',
    'measured_vs_formula',
    'with_messages_MB',
    'measured_vs_with_messages',
)


# name -> (model, devices per host M, rates, frameworks, layout). M = 4 only
# for VGG-16 at 100 Mbit/s (issue 24): K = 8 workers of one device, and 2
# hosts of 4 devices (layouts.hosts, issue 26) with the same per-device
# batch; 10 Mbit/s only for the small model (a VGG-16 SGD step would take
# about 50 s there).
SETTINGS = {
    'vgg16 M=1': (
        'vgg16',
        1,
        f'{UNTHROTTLED},1gbit,100mbit',
        ('jax', 'torch'),
        'data_parallel',
    ),
    'vgg16_slim M=1': (
        'vgg16_slim',
        1,
        f'{UNTHROTTLED},1gbit,100mbit,10mbit',
        ('jax', 'torch'),
        'data_parallel',
    ),
    'vgg16 M=4': (
        'vgg16',
        4,
        f'{UNTHROTTLED},100mbit',
        ('jax',),
        'data_parallel',
    ),
    'vgg16 2 hosts x 4': (
        'vgg16',
        4,
        f'{UNTHROTTLED},100mbit',
        ('jax',),
        'hosts',
    ),
}
MODULES = {'jax': 'bench.slow_link', 'torch': 'bench.slow_link_torch'}
RESULT = 'slow_link'


def measure(
    setting: str,
    framework: str,
    *,
    rounds: int,
    steps: int,
    rates: Optional[str] = None,
) -> list[dict]:
  model, devices, default_rates, _, layout = SETTINGS[setting]
  args = [
      '--model',
      model,
      '--devices',
      str(devices),
      '--rates',
      rates or default_rates,
      '--rounds',
      str(rounds),
      '--steps',
      str(steps),
  ]
  if framework == 'jax':
    args += ['--layout', layout]
  t0, load0 = time.time(), os.getloadavg()
  results = run_on_link(MODULES[framework], args, devices=devices)
  qdiscs = {
      rate: netns.qdisc_args(rate_arg(rate))
      for rate in (rates or default_rates).split(',')
  }
  for r in results:
    r.update(
        wall_s=time.time() - t0,
        loadavg_before=load0,
        loadavg_after=os.getloadavg(),
        date=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
        qdisc=qdiscs,
    )
  return results


def main(argv=None):
  p = worker_parser(__doc__)
  p.add_argument(
      '--settings',
      default=','.join(SETTINGS),
      help=f'comma-separated, of: {", ".join(SETTINGS)}',
  )
  p.add_argument('--frameworks', default='jax,torch')
  p.add_argument(
      '--report-only',
      action='store_true',
      help='rebuild the table from the measurements already in the JSON',
  )
  a = p.parse_args(argv)
  if a.rank is not None:
    a.rank = int(a.rank)
    a.batch = a.batch or BATCH.get(a.model, 8)
    if a.devices == 1:  # one core each; M > 1 devices share the machine's cores
      procs.pin_to_core(a.rank)
    jax_worker(a)
    return None
  from bench import common

  path = common.RESULTS / f'{RESULT}.json'
  doc = json.loads(path.read_text()) if path.exists() else {}
  measured = doc.get('measured', {})
  for setting in [] if a.report_only else a.settings.split(','):
    for framework in a.frameworks.split(','):
      if framework not in SETTINGS[setting][3]:
        continue
      if framework == 'torch' and not _torch_available():
        print(
            'PyTorch with gloo is not installed: its peers are skipped'
            " (pip install '.[bench]')",
            flush=True,
        )
        continue
      print(f'=== {setting}, {framework}', flush=True)
      measured.setdefault(setting, {})[framework] = measure(
          setting, framework, rounds=a.rounds, steps=a.steps
      )
      runs = [
          r for by_fw in measured.values() for rs in by_fw.values() for r in rs
      ]
      doc['measured_by'] = {
          'command': common.command(),
          'date': max(r['date'] for r in runs),
          'loadavg': max(r['loadavg_after'][0] for r in runs),
      }
  report(measured, doc.get('measured_by'))


def _torch_available() -> bool:
  try:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()
  except ImportError:
    return False


def report(measured: dict, measured_by: Optional[dict] = None) -> None:
  """Rows, the per-message byte model, the projection check and the table.

  ``measured_by``: the command and time of the last measurement, which a
  ``--report-only`` rebuild keeps (its own command is not the one that
  measured)."""
  from bench import common

  rows = []
  for setting, by_framework in measured.items():
    for framework, results in by_framework.items():
      rows += rows_of(results, f'{setting} {framework}')
  message = fit_message_bytes(measured)
  add_message_model(rows, measured, message)
  check = projection_check(measured, message)
  table_md = (
      common.table(rows, COLUMNS)
      + '\n\nProjection check (bench/netmodel.py):\n\n'
      + common.table(check['rows'], PROJECTION_COLUMNS)
      + '\n\n16 GPU-class workers (corrected model):\n\n'
      + common.table(check['gpu_class'], GPU_COLUMNS)
  )
  common.write(
      RESULT,
      {
          'measured': measured,
          'rows': rows,
          'message_model': message,
          'projection': check,
          'measured_by': measured_by,
      },
      table_md,
      NOTES + ' ' + check['notes'],
  )


# The per-message model is fitted on this setting and framework only and
# checked on every other row.
FIT_MESSAGES = ('vgg16 M=1', 'jax')
# The projection's correction is fitted at this rate only.
FIT_RATE = '100mbit'


def _ranks(results: list[dict]) -> int:
  return results[0]['workers']


def fit_message_bytes(measured: dict) -> dict:
  """Bytes per all-reduce operand and crossing ring message beyond the
  formula: each operand's ring sends 2 (P - 1) messages across the link in
  each direction. Least squares through 0 over the compressed variants of
  ``FIT_MESSAGES`` at every rate (the larger direction)."""
  setting, framework = FIT_MESSAGES
  results = measured.get(setting, {}).get(framework)
  if not results:
    return {'bytes_per_message': 0.0, 'fitted_on': None}
  w0 = results[0]
  xs, ys = [], []
  for rate, by_name in w0['sent'].items():
    for name in by_name:
      if name == 'sgd':
        continue  # its few messages drown in its payload's acknowledgements
      sent = max(statistics.median(w['sent'][rate][name]) for w in results)
      xs.append(_messages(results, name))
      ys.append(sent - netns.wire_bytes(w0['formula_payload_bytes'][name]))
  h = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
  return {
      'bytes_per_message': h,
      'fitted_on': f'{setting} {framework}, compressed variants, every rate',
  }


def _messages(results: list[dict], name: str) -> int:
  """Ring messages per step crossing the link in one direction: recorded by
  the jax worker; for a ring of the P ranks of both hosts, 2 (P - 1) per
  all-reduce."""
  w0 = results[0]
  if 'crossing_messages' in w0:
    return w0['crossing_messages'][name]
  return 2 * (_ranks(results) - 1) * w0['allreduce_operands'][name]


def message_model_bytes(results: list[dict], name: str, message: dict) -> float:
  w0 = results[0]
  return netns.wire_bytes(w0['formula_payload_bytes'][name]) + message[
      'bytes_per_message'
  ] * _messages(results, name)


def add_message_model(rows: list[dict], measured: dict, message: dict) -> None:
  for row in rows:
    results = measured[row['setting'].rsplit(' ', 1)[0]][
        row['setting'].rsplit(' ', 1)[1]
    ]
    model = message_model_bytes(results, row['variant'], message)
    row['with_messages_MB'] = model / 1e6
    row['measured_vs_with_messages'] = (
        1e6 * max(row['link_MB_0to1'], row['link_MB_1to0']) / model
    )


def projection_check(measured: dict, message: dict) -> dict:
  """``bench/netmodel.py``'s step time (a measured unthrottled step plus the
  ring all-reduce of the compiled step's payload at the link's rate) against
  the measured step at each rate; then the same with the link's measured
  bytes model (payload, headers, per-message bytes) and an effective rate
  eta x rate, eta fitted at ``FIT_RATE`` only and checked at the others."""
  from bench import netmodel

  cases = []
  for setting, by_framework in measured.items():
    results = by_framework.get('jax')
    if (
        not results
        or results[0].get('layout', 'data_parallel') != 'data_parallel'
    ):
      continue  # netmodel's ring of K workers is the 1-D layout
    w0 = results[0]
    base = w0['step_s'].get(UNTHROTTLED)
    if base is None:
      continue
    for rate, by_name in w0['step_s'].items():
      if rate == UNTHROTTLED:
        continue
      gbps = netns.bits_per_s(rate) / 1e9
      for name, times in by_name.items():
        unthrottled = statistics.median(base[name])
        payload = sum(w0['allreduce_bytes'][name])
        raw = unthrottled + netmodel.ring_allreduce_s(
            payload, _ranks(results), netmodel.Network(gbps)
        )
        cases.append(
            {
                'setting': setting,
                'rate': rate,
                'variant': name,
                'measured_ms': 1e3 * statistics.median(times),
                'model_ms': 1e3 * raw,
                'unthrottled_s': unthrottled,
                'link_bytes': message_model_bytes(results, name, message),
                'bytes_per_s': gbps * 1e9 / 8,
            }
        )
  fit = [c for c in cases if c['rate'] == FIT_RATE]
  # added time = bytes / (eta rate): least squares of the added time through 0.
  xs = [c['link_bytes'] / c['bytes_per_s'] for c in fit]
  ys = [c['measured_ms'] / 1e3 - c['unthrottled_s'] for c in fit]
  inverse_eta = (
      sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
      if fit
      else 1.0
  )
  for c in cases:
    c['model_error'] = c['model_ms'] / c['measured_ms'] - 1
    c['corrected_ms'] = 1e3 * (
        c['unthrottled_s'] + inverse_eta * c['link_bytes'] / c['bytes_per_s']
    )
    c['corrected_error'] = c['corrected_ms'] / c['measured_ms'] - 1
    c['fitted_here'] = c['rate'] == FIT_RATE
  held_out = [abs(c['corrected_error']) for c in cases if not c['fitted_here']]
  gpu = gpu_class_prediction(measured, 1 / inverse_eta, message)
  notes = (
      f'Projection: model_ms = unthrottled step + ring all-reduce of the HLO payload at the rate'
      f' (netmodel); corrected_ms = unthrottled step + the link bytes model / (eta x rate), eta ='
      f' {1 / inverse_eta:.3f} fitted at {FIT_RATE} only; largest corrected error at the other'
      f' rates: {100 * max(held_out, default=float("nan")):.1f}%. Per-message bytes'
      f' {message["bytes_per_message"]:.0f} per crossing ring message, fitted on'
      f' {message["fitted_on"]}.'
  )
  return {
      'rows': cases,
      'eta': 1 / inverse_eta,
      'max_held_out_error': max(held_out, default=None),
      'gpu_class': gpu,
      'notes': notes,
  }


def gpu_class_prediction(
    measured: dict, eta: float, message: dict
) -> list[dict]:
  """The corrected model for the paper's cluster: VGG-16 on K = 16 workers
  with cluster_projection's GPU-class compute time (the paper fit at 10
  Gbit/s), the measured per-leaf payloads and collective counts of VGG-16."""
  from bench import cluster_projection, netmodel

  results = measured.get('vgg16 M=1', {}).get('jax')
  if not results:
    return []
  w0 = results[0]
  check = cluster_projection.paper_check(w0['d'], 0)
  compute = (
      next(r for r in check['rows'] if r['gbps'] == 10)['compute_ms_fit64']
      / 1e3
  )
  k = 16
  out = []
  for gbps in (1, 10, 25):
    row = {'K': k, 'gbps': gbps, 'compute_ms': 1e3 * compute}
    times = {}
    for name in w0['allreduce_bytes']:
      payload = sum(w0['allreduce_bytes'][name])
      messages = 2 * (k - 1) * w0['allreduce_operands'][name]
      wire = (
          netns.wire_bytes(2 * (k - 1) / k * payload)
          + message['bytes_per_message'] * messages
      )
      times[name] = compute + wire / (eta * gbps * 1e9 / 8)
      row[f'{name}_step_ms'] = 1e3 * times[name]
    for name in times:
      if name != 'sgd':
        row[f'{name}_speedup'] = times['sgd'] / times[name]
    out.append(row)
  return out


PROJECTION_COLUMNS = (
    'setting',
    'rate',
    'variant',
    'measured_ms',
    'model_ms',
    'model_error',
    'corrected_ms',
    'corrected_error',
    'fitted_here',
)
GPU_COLUMNS = (
    'K',
    'gbps',
    'compute_ms',
    'sgd_step_ms',
    'def@256_step_ms',
    'def@64_speedup',
    'def@256_speedup',
    'def@1024_speedup',
)


NOTES = (
    'Two hosts on this machine (bench.netns): processes in their own network namespaces joined'
    ' by a veth pair, each end sending at most the rate (token bucket of 16 KB), M devices each;'
    ' K = 2M workers of one device on the 1-D layout, or 2 hosts of M devices (layouts.hosts);'
    ' per-leaf RBGS. step_ms: median over rounds (process 0);'
    " link_added_ms: step time minus the same variant's unthrottled step time in the same round"
    " (median); speedup: SGD's (DDP's) step time / the variant's in the same round; link_MB:"
    ' bytes each direction carried per step (qdisc counters, idle traffic subtracted);'
    " formula_MB: the formula in bench/slow_link.py's docstring, written before measuring."
)


if __name__ == '__main__':
  main()
