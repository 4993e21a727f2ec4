"""Projected step time and speedup on a cluster (``bench/netmodel.py``).

Combines a measured compute time per step with the ring all-reduce model
t = 2 (K-1) latency + 2 (K-1)/K bytes / bandwidth to project the step time
of SGD and of the RBGS methods for K up to 1024 workers and links of 1 to
400 Gbit/s, and the time-to-accuracy speedup over SGD (equal epochs: the
paper's DEF reaches SGD's accuracy in as many epochs; EF diverges at ratio
>= 256 and has no time-to-accuracy there).

The compute time comes from, in order: --compute-ms; the 'local' variant
(SGD without the gradient all-reduce) of ``bench/results/overhead.json``
for the model; or a quick measurement here. Each method's extra local work
(RBGS bookkeeping) is its measured step time minus the 'local' one.

It also checks the model against the paper's VGG-16 speedups (x3.6 at ratio
64 and x4.0 at 256 on 16 P40 GPUs, 4 per machine) and says which
assumptions reproduce them.

Run: python -m bench.cluster_projection [--model vgg16] [--compute-ms 30]
"""

from __future__ import annotations

from bench import common  # noqa: F401

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402

from bench import netmodel  # noqa: E402
from defjax.training.models import vgg  # noqa: E402

WORKERS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BANDWIDTHS = (1, 10, 25, 100, 400)  # Gbit/s
RATIOS = (16, 64, 256, 1024)
METHODS = ('def', 'ef', 'saef', 'psync')
LATENCY_S = 10e-6  # per ring hop; a fast Ethernet/IB fabric is 2-20 us
# Paper Table 1 (VGG-16, CIFAR-10): EF diverges at ratio >= 256.
DIVERGES = {'ef': 256}
PAPER = {64: 3.6, 256: 4.0}
PAPER_WORKERS = 16


def model_sizes(model: str) -> tuple[int, int]:
  s = common.Setup(model, 1, 1)
  return s.num_params, s.model_state_elements


def vgg16_train_flops_per_image() -> float:
  """Forward + backward FLOPs of CIFAR VGG-16 per image (3x forward convs/dense)."""
  flops, hw, cin = 0, 32, 3
  for item in vgg.VGG16:
    if item == 'M':
      hw //= 2
    else:
      flops += 2 * hw * hw * 9 * cin * item
      cin = item
  flops += 2 * cin * 10
  return 3 * flops


def measured_times(model: str, path=None) -> dict:
  """compute_s and per-method overhead_s from overhead.json or a quick run."""
  path = path or common.RESULTS / 'overhead.json'
  res = None
  if path.exists():
    doc = json.loads(path.read_text())
    cands = [
        r
        for r in doc['results']
        if r['model'] == model and 'local' in r['step_s']
    ]
    if cands:
      res = max(cands, key=lambda r: r['batch_per_worker'])
      source = f'{path.name} ({model}, batch {res["batch_per_worker"]}/worker, {doc["date"]})'
  if res is None:
    from bench import overhead

    res = overhead.measure(
        model,
        16 if model != 'cnn' else 128,
        rounds=2,
        steps=1,
        variants=('sgd', 'def', 'local'),
        profile=False,
    )
    source = f'quick measurement here ({model}, batch {res["batch_per_worker"]}/worker, 2 rounds)'
  # The K simulated workers of overhead.py share this machine's cores: one
  # worker alone on such a machine computes its batch in about 1/K of the step.
  k = res['workers']
  local = res['step_s']['local']['median'] / k
  raw, steps = res['raw_sample_s'], res['steps_per_sample']
  # Per-round differences (same round, same machine load), then the median.
  overhead_s = {
      m: max(
          0.0,
          statistics.median(a - b for a, b in zip(raw[m], raw['local']))
          / steps
          / k,
      )
      for m in METHODS
      if m in raw
  }
  for (
      m
  ) in METHODS:  # EF, SAEF and PSync compile to DEF's program (lam is state)
    overhead_s.setdefault(m, overhead_s.get('def', 0.0))
  source += f', step of {k} workers / {k}'
  return {
      'compute_s': local,
      'overhead_s': overhead_s,
      'source': source,
      'workers_measured': res['workers'],
      'batch_per_worker': res['batch_per_worker'],
  }


def project(
    compute_s: float,
    overhead_s: dict,
    d: int,
    bn: int,
    latency_s: float = LATENCY_S,
    workers=WORKERS,
    bandwidths=BANDWIDTHS,
    ratios=RATIOS,
) -> list[dict]:
  """One row per (K, bandwidth): SGD step time and every method's speedup."""
  rows = []
  for k in workers:
    for bw in bandwidths:
      net = netmodel.Network(bw, latency_s)
      sgd_bytes = netmodel.payload_bytes(d, model_state=bn, dense=True)
      row = {
          'K': k,
          'gbps': bw,
          'sgd_step_ms': 1e3 * netmodel.step_s(compute_s, sgd_bytes, k, net),
          'sgd_comm_frac': (
              netmodel.ring_allreduce_s(sgd_bytes, k, net)
              / netmodel.step_s(compute_s, sgd_bytes, k, net)
          ),
      }
      for m in METHODS:
        for r in ratios:
          s = netmodel.speedup(
              compute_s,
              d,
              r,
              k,
              net,
              model_state=bn,
              overhead_s=overhead_s.get(m, 0.0),
          )
          row[f'{m}@{r}'] = s
          row[f'{m}@{r}_tta'] = (
              float('nan') if r >= DIVERGES.get(m, math.inf) else s
          )
      rows.append(row)
  return rows


def paper_check(d: int, bn: int, latency_s: float = LATENCY_S) -> dict:
  """Which compute time per step reproduces x3.6 at 64 (and x4.0 at 256)?"""
  flops = vgg16_train_flops_per_image()
  rows = []
  for bw in (1, 10, 25, 40, 56, 100):
    net = netmodel.Network(bw, latency_s)
    row = {
        'gbps': bw,
        'sgd_comm_ms': (
            1e3
            * netmodel.ring_allreduce_s(
                netmodel.payload_bytes(d, model_state=bn, dense=True),
                PAPER_WORKERS,
                net,
            )
        ),
    }
    for fit, other in ((64, 256), (256, 64)):
      c = netmodel.compute_for_speedup(
          PAPER[fit], d, fit, PAPER_WORKERS, net, model_state=bn
      )
      row[f'compute_ms_fit{fit}'] = 1e3 * c
      row[f'pred@{other}_fit{fit}'] = (
          netmodel.speedup(c, d, other, PAPER_WORKERS, net, model_state=bn)
          if c == c
          else float('nan')
      )
      # Sustained TFLOP/s a GPU would need for that compute time at 128 or 8 images.
      row[f'tflops_b128_fit{fit}'] = (
          flops * 128 / c / 1e12 if c == c and c > 0 else float('nan')
      )
    rows.append(row)
  # Both numbers together: step(64) / step(256) = 4.0 / 3.6 means
  # (u + T/64) = 1.111 (u + T/256), u = compute + fixed overhead, T = SGD's
  # transfer time; then 3.6 (u + T/64) = c + T needs T <= 0.42 * T: impossible.
  g = PAPER[256] / PAPER[64]
  t_over_u = (g - 1) / (1 / 64 - g / 256)
  sgd_step_over_u = PAPER[64] * (1 + t_over_u / 64)
  return {
      'rows': rows,
      'workers': PAPER_WORKERS,
      'latency_s': latency_s,
      'vgg16_train_gflop_per_image': flops / 1e9,
      'both_numbers': {
          'T_sgd_over_u': t_over_u,
          'sgd_step_over_u': sgd_step_over_u,
          'consistent': sgd_step_over_u >= t_over_u,
      },
  }


def plot(scenarios: dict, path, d: int) -> None:
  """Speedup of DEF vs bandwidth (K = 16) and vs K (10 Gbit/s), per scenario."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(
      len(scenarios), 2, figsize=(11, 4 * len(scenarios)), squeeze=False
  )
  for (title, (compute_s, rows)), ax2 in zip(scenarios.items(), axes):
    ratios = sorted(
        {
            int(k.split('@')[1])
            for k in rows[0]
            if k.startswith('def@') and '_' not in k
        }
    )
    k16 = [r for r in rows if r['K'] == 16]
    at10 = [r for r in rows if r['gbps'] == 10]
    for ratio in ratios:
      ax2[0].plot(
          [r['gbps'] for r in k16],
          [r[f'def@{ratio}'] for r in k16],
          marker='o',
          label=f'DEF ratio {ratio}',
      )
      ax2[1].plot(
          [r['K'] for r in at10],
          [r[f'def@{ratio}'] for r in at10],
          marker='o',
          label=f'DEF ratio {ratio}',
      )
    ax2[0].set(
        xscale='log',
        xlabel='link bandwidth (Gbit/s)',
        ylabel='speedup over SGD',
        title=f'{title}: compute {1e3 * compute_s:.0f} ms, K = 16',
    )
    ax2[1].set(
        xscale='log',
        xlabel='workers K',
        ylabel='speedup over SGD',
        title=f'{title}: 10 Gbit/s',
    )
    for ax in ax2:
      ax.axhline(1, color='gray', lw=0.8)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
  fig.suptitle(
      f'Projected step-time speedup of DEF over SGD, d = {d:,} (ring all-reduce model)'
  )
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


COLUMNS = (
    'scenario',
    'K',
    'gbps',
    'sgd_step_ms',
    'sgd_comm_frac',
    'def@16',
    'def@64',
    'def@256',
    'def@1024',
    'ef@256_tta',
    'psync@256',
)
PAPER_COLUMNS = (
    'gbps',
    'sgd_comm_ms',
    'compute_ms_fit64',
    'pred@256_fit64',
    'tflops_b128_fit64',
    'compute_ms_fit256',
    'pred@64_fit256',
)


def main(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument('--model', default='vgg16')
  p.add_argument('--compute-ms', type=float, default=None)
  p.add_argument(
      '--overhead-ms',
      type=float,
      default=None,
      help='extra local ms per step of every compressed method',
  )
  p.add_argument('--latency-us', type=float, default=LATENCY_S * 1e6)
  a = p.parse_args(argv)
  d, bn = model_sizes(a.model)
  if a.compute_ms is not None:
    ov = (a.overhead_ms or 0.0) / 1e3
    meas = {
        'compute_s': a.compute_ms / 1e3,
        'overhead_s': {m: ov for m in METHODS},
        'source': '--compute-ms',
    }
  else:
    meas = measured_times(a.model)
    if a.overhead_ms is not None:
      meas['overhead_s'] = {m: a.overhead_ms / 1e3 for m in METHODS}
  lat = a.latency_us * 1e-6
  check = paper_check(d, bn, lat)
  # Two compute scenarios: what was measured here, and a GPU-class step (the
  # compute time that reproduces the paper's x3.6 at ratio 64 on 10 Gbit/s).
  gpu_c = (
      next(r for r in check['rows'] if r['gbps'] == 10)['compute_ms_fit64']
      / 1e3
  )
  scenarios = {
      'measured': (
          meas['compute_s'],
          project(meas['compute_s'], meas['overhead_s'], d, bn, lat),
      ),
      'gpu_class': (gpu_c, project(gpu_c, {}, d, bn, lat)),
  }
  rows = []
  for name, (_, rs) in scenarios.items():
    rows += [dict(r, scenario=name) for r in rs]
  common.RESULTS.mkdir(parents=True, exist_ok=True)
  png = common.RESULTS / 'cluster_projection.png'
  plot(scenarios, png, d)
  shown = [r for r in rows if r['K'] in (2, 16, 128, 1024)]
  table_md = (
      common.table(shown, COLUMNS)
      + '\n\nPaper check (VGG-16, K = 16, equal epochs):\n\n'
      + common.table(check['rows'], PAPER_COLUMNS)
  )
  both = check['both_numbers']
  notes = (
      f'{a.model}: d = {d:,}, synced BN values = {bn:,}. Scenario "measured": compute'
      f' {1e3 * meas["compute_s"]:.1f} ms/step per worker from {meas["source"]}; extra local'
      f' ms/step per method {({m: round(1e3 * v, 2) for m, v in meas["overhead_s"].items()})};'
      f' latency {a.latency_us:g} us'
      f' per hop. Scenario "gpu_class": compute {1e3 * gpu_c:.1f} ms/step (the paper fit at 10'
      ' Gbit/s below), no extra local time. No compute/communication overlap.'
      ' Columns m@r: step-time speedup of method m at'
      ' ratio r over SGD (time-to-accuracy at equal epochs); *_tta is NaN where the paper reports'
      ' divergence. Plot: ' + png.name + '.\n'
      "Paper check: compute_ms_fitR is the compute time per step that gives the paper's speedup at"
      " ratio R on a ring of 16 at that bandwidth; pred@R' its prediction at the other ratio;"
      ' tflops_b128 the sustained TFLOP/s a GPU needs to do 128 images of VGG-16 training'
      f' ({check["vgg16_train_gflop_per_image"]:.2f} GFLOP/image) in that time (P40 peak: 12).'
      f' Both numbers at once need T_sgd/u = {both["T_sgd_over_u"]:.2f} (from 4.0/3.6) but then'
      f' SGD step/u = {both["sgd_step_over_u"]:.2f} < T_sgd/u: not consistent with one bandwidth'
      ' in this model (consistent=' + str(both['consistent']) + ').'
  )
  common.write(
      'cluster_projection',
      {
          'measured': meas,
          'd': d,
          'bn': bn,
          'rows': rows,
          'paper_check': check,
          'plot': str(png),
      },
      table_md,
      notes,
  )
  return rows, check


if __name__ == '__main__':
  main()
