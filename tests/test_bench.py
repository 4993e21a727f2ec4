"""Smoke tests of the benchmark scripts: each core function on a tiny setting.

No timing assertions: timings are only checked to be positive numbers.
"""

import json
import math
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import cluster_projection, common, compressor_cost, overhead, run_all, wire_bytes  # noqa: E402
from bench import netmodel  # noqa: E402


@pytest.mark.parametrize('method,ratio', [('def', 64), ('sgd', 1)])
def test_cnn_wire_bytes_equal_the_limit(method, ratio):
  setup = common.Setup('cnn', 8, 2)
  row = wire_bytes.check(setup, method, ratio)
  assert row['all_reduce_bytes'] == row['limit_bytes'], row
  assert row['verdict'] == 'equal'
  d = setup.num_params
  sent = d if method == 'sgd' else math.ceil(d / ratio)
  assert row['limit_bytes'] == 4 * sent + 4


def test_wire_bytes_compiles_identical_programs_once():
  setup = common.Setup('cnn', 8, 2)
  cache = {}
  first = wire_bytes.check(setup, 'ef', 256, cache)
  second = wire_bytes.check(
      setup, 'def', 256, cache
  )  # lam is state: same program
  assert second['same_program_as'] == 'ef@256'
  assert second['all_reduce_bytes'] == first['all_reduce_bytes']


def test_compressor_cost_tiny():
  res = compressor_cost.measure(10_000, 64, 'flat', rounds=1)
  assert set(res['aggregate_s']) == {'rbgs', 'randomk', 'topk', 'dense_floor'}
  assert all(s['median'] > 0 for s in res['aggregate_s'].values())
  assert 'topk' in res['ratio_to_rbgs']
  rows = compressor_cost.rows_of(res)
  assert [r['compressor'] for r in rows] == ['rbgs', 'randomk', 'topk']
  assert all(r['x_floor'] > 0 for r in rows)
  tree = compressor_cost.make_tree(20_000, 'vgg_like')
  assert (
      len(tree) == 13 * 4 + 2
  )  # conv kernel, bias, BN scale, BN bias; classifier


def test_vgg_like_shapes_scale_to_target():
  for target in (15_000_000, 25_000_000):
    d = sum(math.prod(s) for s in compressor_cost.vgg_like_shapes(target))
    assert abs(d - target) / target < 0.01


def test_overhead_tiny():
  # 'local' (no gradient all-reduce) must get past the step's collective check.
  res = overhead.measure(
      'cnn',
      2,
      rounds=1,
      steps=1,
      variants=('sgd', 'def', 'local'),
      profile=False,
  )
  assert set(res['ratio_to_sgd']) == {'def', 'local'}
  assert all(s['median'] > 0 for s in res['step_s'].values())
  assert len(overhead.rows_of(res)) == 3


def test_cluster_projection_rows_and_paper_check(tmp_path):
  d, bn = cluster_projection.model_sizes('vgg16')
  assert d == 15_253_578 and bn == 2 * 4224  # the authors' VGG-16
  rows = cluster_projection.project(
      0.03,
      {'def': 0.001},
      d,
      bn,
      workers=(1, 16),
      bandwidths=(10,),
      ratios=(64,),
  )
  one, sixteen = rows
  assert one['def@64'] == pytest.approx(
      0.03 / 0.031
  )  # K=1: only the overhead shows
  assert sixteen['def@64'] > 1
  check = cluster_projection.paper_check(d, bn)
  row10 = next(r for r in check['rows'] if r['gbps'] == 10)
  net = netmodel.Network(10, cluster_projection.LATENCY_S)
  c = row10['compute_ms_fit64'] / 1e3
  assert netmodel.speedup(c, d, 64, 16, net, model_state=bn) == pytest.approx(
      3.6
  )
  assert check['both_numbers']['consistent'] is False
  cluster_projection.plot({'test': (0.03, rows)}, tmp_path / 'p.png', d)
  assert (tmp_path / 'p.png').stat().st_size > 0


def test_write_and_summary_section(tmp_path, monkeypatch):
  monkeypatch.setattr(common, 'RESULTS', tmp_path)
  monkeypatch.setattr(run_all, 'RESULTS', tmp_path)
  rows = [{'a': 1, 'b': 0.5}]
  path = common.write(
      'smoke', {'rows': rows}, common.table(rows, ('a', 'b')), 'a note'
  )
  doc = json.loads(path.read_text())
  assert doc['machine']['cpu_count'] >= 1 and doc['rows'] == rows
  text = run_all.section('smoke', None)
  assert '| a | b |' in text and 'a note' in text and 'command:' in text


def _between(text, begin, end):
  assert begin in text and end in text
  return text[text.index(begin) : text.index(end) + len(end)]


def test_recorded_figures_come_from_the_results():
  """The benchmarks page's tables and the README's headline are exactly what
  run_all writes from the committed JSON files: no hand-edited number survives.
  """
  page = run_all.PAGE.read_text()
  assert _between(page, run_all.BEGIN, run_all.END) == run_all.tables_section()
  readme = run_all.README.read_text()
  assert (
      _between(readme, run_all.HEADLINE_BEGIN, run_all.HEADLINE_END)
      == run_all.headline()
  )


def test_update_pages_rewrites_only_between_the_markers(tmp_path):
  results = tmp_path / 'results'
  results.mkdir()
  machine = {
      'cpu_count': 2,
      'backend': 'cpu',
      'device_kind': 'cpu',
      'num_devices': 8,
      'jax': '0.10.2',
      'loadavg': [1.5, 1, 1],
  }
  doc = {
      'date': '2026-01-02T03:04:05+00:00',
      'command': 'python -m bench.overhead',
      'machine': machine,
      'table_md': '| a |\n|---|\n| 7 |',
  }
  (results / 'overhead.json').write_text(json.dumps(doc))
  rows = [
      {
          'setting': s,
          'rate': rate,
          'variant': v,
          'step_ms': ms,
          'link_added_ms': ms - 100,
          'link_MB_0to1': mb,
          'measured_vs_formula': 1.25,
          'speedup': 900 / ms,
      }
      for s, v, ms, mb in (
          ('vgg16 M=1 jax', 'sgd', 900, 64.0),
          ('vgg16 M=1 jax', 'def@256', 300, 0.33),
      )
      for rate in ('none', '100mbit')
  ]
  (results / 'slow_link.json').write_text(
      json.dumps(
          {
              'date': '2026-01-02T03:04:05+00:00',
              'command': 'python -m bench.slow_link',
              'machine': machine,
              'rows': rows,
              'table_md': '',
          }
      )
  )
  page = tmp_path / 'benchmarks.md'
  page.write_text(f'before\n{run_all.BEGIN}\nstale 99\n{run_all.END}\nafter\n')
  readme = tmp_path / 'README.md'
  readme.write_text(
      f'top\n{run_all.HEADLINE_BEGIN}\nstale 98\n{run_all.HEADLINE_END}\nend\n'
  )
  assert run_all.update_pages(page, readme, results) == [page, readme]
  text = page.read_text()
  assert text.startswith('before\n') and text.endswith('\nafter\n')
  assert 'stale 99' not in text and '| 7 |' in text
  assert '2026-01-02 03:04 UTC' in text and '`python -m bench.overhead`' in text
  assert 'load average 1.5' in text
  text = readme.read_text()
  assert (
      text.startswith('top\n')
      and text.endswith('\nend\n')
      and 'stale 98' not in text
  )
  assert '64.0 MB per SGD step' in text and '3.0x faster than SGD' in text
  assert (
      '| unthrottled | 900 | 300 | 3 |' in text and '1.25x the formula' in text
  )
  no_markers = tmp_path / 'OTHER.md'
  no_markers.write_text('nothing here\n')
  assert run_all.update_pages(no_markers, no_markers, results) == []
  assert no_markers.read_text() == 'nothing here\n'


def test_run_pair_reports_a_failed_worker():
  from bench import procs

  with pytest.raises(
      RuntimeError, match='bench.no_such_module worker 0 exited'
  ):
    procs.run_pair('bench.no_such_module', [], timeout_s=60)


def test_gpu_bench_tiny():
  """bench.gpu's measurement on the CPU: K = 8 vmapped on one device."""
  import jax
  import defjax
  from bench import gpu
  from defjax import wire

  res = gpu.measure(
      'cnn',
      2,
      variants=(('sgd', 1, 'vmap'), ('def', 64, 'vmap')),
      rounds=1,
      steps=1,
      devices=jax.devices()[:1],
  )
  sgd, def64 = res['rows']
  assert (sgd['variant'], def64['variant']) == ('sgd', 'def@64')
  assert gpu.variant_name('def', 256, 'unroll') == 'def@256 unroll'
  assert sgd['devices'] == 1 and sgd['workers'] == 8
  assert sgd['wire_bytes'] == wire.bytes_per_step(sgd['d'])
  assert def64['wire_bytes'] == wire.bytes_per_step(
      defjax.rbgs(64, per_leaf=True).payload(
          common.Setup('cnn', 8, 2).abstract_params
      )
  )
  assert sgd['x_sgd_median'] == 1.0 and def64['x_sgd_median'] > 0
  assert (
      def64['steps_per_s'] > 0
      and def64['compile_s'] > 0
      and def64['program_gib'] > 0
  )


def test_local_workers_tiny():
  """Unrolled local gradients on 2 devices give the 8-device step's params."""
  from bench import local_workers

  res = local_workers.measure(
      'cnn', 2, rounds=1, steps=1, variants=local_workers.VARIANTS[::2]
  )
  one, unrolled = res['rows']
  assert (one['devices'], unrolled['devices'], unrolled['local_gradients']) == (
      8,
      2,
      'unroll',
  )
  assert one['x_8_devices'] == 1.0 and unrolled['x_8_devices'] > 0
  assert unrolled['max_abs_diff'] < 1e-5


def test_opt_bytes_counts_at_least_the_floor():
  """XLA's bytes for the optimizer cannot be below what the algorithm must
  read and write; DEF's train step moves more than SGD's (it also reads and
  writes e and the gradient point)."""
  from bench import opt_bytes

  rows = {
      v: opt_bytes.optimizer_only('cnn', v, 256)
      for v in ('sgd', 'def_per_leaf')
  }
  for v, row in rows.items():
    assert row['bytes_d'] >= row['floor_d'], (v, row)
  assert rows['sgd']['floor_d'] == 5 and rows['def_per_leaf']['floor_d'] == 7
  sgd, def_ = (
      opt_bytes.train_step('cnn', 2, v, 256) for v in ('sgd', 'def_per_leaf')
  )
  assert def_['bytes_d'] > sgd['bytes_d'] > 0


def test_count_faults_counts_first_touches():
  """A runner that writes every page of a fresh 8 MB mapping faults about
  2048 times (4 KB pages), whatever the allocator; one that allocates nothing
  hardly at all."""
  import mmap

  def fresh():
    m = mmap.mmap(-1, 8 << 20)
    if hasattr(
        mmap, 'MADV_NOHUGEPAGE'
    ):  # 4 KB pages even where THP is 'always'
      m.madvise(mmap.MADV_NOHUGEPAGE)
    for i in range(0, len(m), mmap.PAGESIZE):
      m[i] = 1
    m.close()

  runners, faults = common.count_faults({'fresh': fresh, 'none': lambda: None})
  for _ in range(3):
    runners['fresh']()
    runners['none']()
  assert all(
      f >= (8 << 20) // mmap.PAGESIZE * 0.9 for f in faults['fresh']
  ), faults
  assert all(f < 50 for f in faults['none']), faults


def test_allocator_rows():
  """The table's medians and ratios from two rounds of both allocators."""
  from bench import allocator

  def res(train_s, fault, torch_s, digest='a'):
    return {
        'train': {
            'cnn': {
                'def': {
                    'step_s': train_s,
                    'minflt': fault,
                    'params_sha256': digest,
                }
            }
        },
        'procs': {
            'defjax': {'def@256': {'step_s': 2 * train_s, 'minflt': fault}},
            'torch': {'def@256': {'step_s': torch_s, 'minflt': 0}},
        },
    }

  rounds = [
      {'glibc': res(0.2, 1000, 0.1), 'tcmalloc': res(0.1, 0, 0.1)},
      {'glibc': res(0.4, 3000, 0.2), 'tcmalloc': res(0.1, 2, 0.1, digest='b')},
  ]
  rows = {(r['program'], r['allocator']): r for r in allocator.rows_of(rounds)}
  cnn = rows['cnn (8 devices)', 'tcmalloc']
  assert cnn['ms'] == pytest.approx(100) and cnn['minflt'] == 1
  assert (
      cnn['x_glibc'] == pytest.approx((0.5 + 0.25) / 2)
      and cnn['same_bits'] is False
  )
  assert (
      'same_bits' not in rows['cnn (8 devices)', 'glibc']
  )  # glibc is the yardstick
  assert rows['defjax mlp', 'glibc']['defjax_vs_torch'] == pytest.approx(4)
  assert rows['defjax mlp', 'tcmalloc']['defjax_vs_torch'] == pytest.approx(2)
  assert 'defjax_vs_torch' not in rows['torch mlp', 'glibc']


def test_collective_settings_rows():
  """Medians over rounds and the per-round ratios to pinned and to PyTorch."""
  from bench import collective_settings

  rounds = [
      {
          'pinned': {'def@256': 0.010, 'allreduce_only': 0.040},
          'unpinned': {'def@256': 0.020, 'allreduce_only': 0.040},
          'torch': {'def@256': 0.008, 'allreduce_only': 0.020},
      },
      {
          'pinned': {'def@256': 0.012, 'allreduce_only': 0.050},
          'unpinned': {'def@256': 0.012, 'allreduce_only': 0.100},
          'torch': {'def@256': 0.012, 'allreduce_only': 0.025},
      },
  ]
  rows = {
      (r['setting'], r['variant']): r
      for r in collective_settings.rows_of(rounds)
  }
  assert rows['pinned', 'def@256']['ms'] == pytest.approx(11)
  assert rows['unpinned', 'def@256']['x_pinned'] == pytest.approx((2 + 1) / 2)
  assert rows['unpinned', 'allreduce_only']['x_pinned'] == pytest.approx(
      (1 + 2) / 2
  )
  assert rows['pinned', 'def@256']['vs_torch'] == pytest.approx((1.25 + 1) / 2)
  torch = rows['pinned, 1 thread', 'def@256']
  assert (
      torch['program'] == 'PyTorch'
      and 'vs_torch' not in torch
      and 'x_pinned' not in torch
  )
  assert set(collective_settings.settings()) >= {'pinned', 'unpinned'}
