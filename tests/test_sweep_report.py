"""Tests for the sweep and report tools, on tiny grids of a fake train.py.

The fake training script parses train.py's flags, writes metrics.jsonl and
summary.json with accuracies from ``fake_accuracy`` below, and exits with
train.py's codes, so the tests can check the tables' numbers exactly. The
results of real training are not tested here.
"""

import inspect
import json
import shutil
import math
import pathlib
import shlex
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from defjax.experiments import figures
from defjax.experiments import gap
from defjax.experiments import report
from defjax.experiments import results
from defjax.experiments import sweep

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def fake_accuracy(method, ratio, lam, seed, x):
  """The fake final test accuracy (a fraction) of one run."""
  base = {
      'sgd': 0.90,
      'ef': 0.85,
      'saef': 0.84,
      'psync': 0.83,
      'def': 0.89,
      'def_a': 0.891,
      'ef21_sgdm': 0.87,
      'ef21': 0.5,
  }[method]
  if method == 'def' and x:  # DEF-A's model x of a def run
    base += 0.001
  ratio_cost = 0.0 if method == 'sgd' else 0.004 * math.log2(ratio)
  lam_cost = 0.05 * abs(lam - 0.3) if method in ('def', 'def_a') else 0.0
  return base - ratio_cost - lam_cost + 0.003 * seed * (1 + seed)


FAKE_TRAIN = '''\
"""A stand-in for train.py: same flags, same outputs, same exit codes."""
import json, math, pathlib, sys

{accuracy}

def main(argv):
  workdir = config_path = None
  cfg = {{}}
  i = 0
  while i < len(argv):
    if argv[i] in ('--workdir', '--config'):
      if argv[i] == '--workdir':
        workdir = pathlib.Path(argv[i + 1])
      else:
        config_path = pathlib.Path(argv[i + 1])
      i += 2
      continue
    key, _, value = argv[i].removeprefix('--config.').partition('=')
    cfg[key] = value
    i += 1
  # Every launch is counted, to test that finished runs are skipped.
  with open(config_path.parent / 'launches.txt', 'a') as f:
    f.write(workdir.name + '\\n')
  method = cfg['optim.method']
  ratio = int(cfg['optim.ratio'])
  seed = int(cfg['seed'])
  lam = float(cfg.get('optim.lam', 0.3))
  epochs = int(cfg.get('num_epochs', 4))
  if cfg.get('crash') == method:
    print('Traceback: boom')
    return 1
  diverge = (method == 'ef' and ratio >= 1024) or (
      method == 'psync' and ratio >= 1024 and seed == 1)
  interrupt = cfg.get('interrupt_once') == '1' and not (
      workdir / 'checkpoint').exists()
  workdir.mkdir(parents=True, exist_ok=True)
  final = fake_accuracy(method, ratio, lam, seed, False)
  final_x = fake_accuracy(method, ratio, lam, seed, True)
  rows = []
  for epoch in range(1, epochs + 1):
    frac = (epoch / epochs) ** 0.5
    loss = float('nan') if diverge and epoch == 2 else 2.0 / epoch
    rows.append(dict(step=10 * epoch, epoch=float(epoch), train_loss=loss,
                     test_accuracy=final * frac,
                     test_accuracy_x=final_x * frac ** 0.5,
                     lr=0.1 if epoch <= epochs // 2 else 0.01,
                     wall_time=1.5 * epoch, bytes_sent=1000 * epoch))
    if diverge and epoch == 2:
      break
    if interrupt and epoch == 1:
      break
  with open(workdir / 'metrics.jsonl', 'a') as f:
    for row in rows:
      f.write(json.dumps(row) + '\\n')
  print(f'{{method}} ratio {{ratio}} seed {{seed}}: {{len(rows)}} evals')
  if interrupt:
    (workdir / 'checkpoint').mkdir()
    return 4
  status = 'diverged' if diverge else 'completed'
  summary = dict(
      status=status, final_test_accuracy=None if diverge else final,
      final_test_accuracy_x=None if diverge else final_x,
      final_train_loss=rows[-1]['train_loss'], steps=rows[-1]['step'],
      wall_time=rows[-1]['wall_time'], bytes_sent=rows[-1]['bytes_sent'],
      params_sha256='0' * 64, steps_per_epoch=10,
      config=dict(dataset='fake_mnist', model='cnn', num_epochs=epochs,
                  seed=seed, optim=dict(method=method, ratio=ratio, lam=lam,
                                        decay_at=[0.5, 0.75])))
  if diverge:
    summary['diverged_at_step'] = rows[-1]['step']
  (workdir / 'summary.json').write_text(json.dumps(summary))
  return 3 if diverge else 0

if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
'''


def make_fake(tmp_path):
  """Writes a fake train.py and a base config file beside it."""
  train = tmp_path / 'fake_train.py'
  train.write_text(
      FAKE_TRAIN.format(
          accuracy=textwrap.dedent(inspect.getsource(fake_accuracy))
      )
  )
  config = tmp_path / 'base_config.py'
  config.write_text('def get_config():\n  return None\n')
  return train, config


@pytest.fixture
def fake(tmp_path):
  return make_fake(tmp_path)


def launches(config):
  path = config.parent / 'launches.txt'
  return path.read_text().split() if path.exists() else []


def run_sweep(fake, out, *args):
  train, config = fake
  return sweep.main(
      ['--config', str(config), '--out', str(out), '--train', str(train), *args]
  )


def test_grid_expansion():
  runs = sweep.expand_grid(
      config='c.py',
      out='/tmp/sw',
      methods=['sgd', 'ef', 'def'],
      ratios=[16, 64],
      seeds=[0, 1],
      lams=[0.2, 0.3],
      overrides=['num_epochs=5', 'config.optim.lr=0.05'],
      train='t.py',
  )
  names = [r.name for r in runs]
  # SGD once per seed at ratio 1; lam only multiplies DEF; seed-major order.
  assert names[:7] == [
      'sgd-r1-s0',
      'ef-r16-s0',
      'ef-r64-s0',
      'def-r16-lam0.2-s0',
      'def-r16-lam0.3-s0',
      'def-r64-lam0.2-s0',
      'def-r64-lam0.3-s0',
  ]
  assert len(runs) == 14 and len(set(names)) == 14
  assert names[7] == 'sgd-r1-s1'
  run = runs[4]
  assert run.workdir == pathlib.Path('/tmp/sw/def-r16-lam0.3-s0')
  assert run.command[1:] == [
      str(pathlib.Path('t.py').resolve()),
      '--config',
      str(pathlib.Path('c.py').resolve()),
      '--workdir',
      str(run.workdir),
      '--config.optim.method=def',
      '--config.optim.ratio=16',
      '--config.seed=0',
      '--config.optim.lam=0.3',
      '--config.num_epochs=5',
      '--config.optim.lr=0.05',
  ]
  assert '--config.optim.ratio=1' in runs[0].command
  assert not any('lam' in a for a in runs[1].command)


def test_grid_without_lams_and_config_argument():
  runs = sweep.expand_grid(
      config='c.py:small', out='o', methods=['def'], ratios=[4], seeds=[3]
  )
  assert [r.name for r in runs] == ['def-r4-s3']
  command = runs[0].command
  assert command[command.index('--config') + 1] == (
      str(pathlib.Path('c.py').resolve()) + ':small'
  )


@pytest.mark.parametrize(
    'kwargs',
    [
        dict(methods=['sgd', 'topk']),
        dict(ratios=[0]),
        dict(overrides=['num_epochs']),
    ],
)
def test_grid_rejects_bad_input(kwargs):
  args = dict(config='c.py', out='o', methods=['ef'], ratios=[4], seeds=[0])
  with pytest.raises(ValueError):
    sweep.expand_grid(**(args | kwargs))


def test_sweep_runs_records_and_skips_finished_runs(fake, tmp_path, capsys):
  out = tmp_path / 'sweep'
  args = ('--methods', 'sgd,def', '--ratios', '16', '--seeds', '0,1')
  assert run_sweep(fake, out, *args) == 0
  assert sorted(launches(fake[1])) == [
      'def-r16-s0',
      'def-r16-s1',
      'sgd-r1-s0',
      'sgd-r1-s1',
  ]
  progress = capsys.readouterr().out
  assert '4 runs, 0 finished, 4 to run' in progress
  assert '[1/4] sgd-r1-s0  completed' in progress

  record = json.loads((out / 'sweep.json').read_text())
  assert record['command'].startswith('python -m defjax.sweep --config')
  assert record['machine']['cpu_count'] >= 1
  assert {'jax', 'flax', 'optax'} <= set(record['packages'])
  assert record['date']
  assert [(r['name'], r['status'], r['launched']) for r in record['runs']] == [
      ('sgd-r1-s0', 'completed', True),
      ('def-r16-s0', 'completed', True),
      ('sgd-r1-s1', 'completed', True),
      ('def-r16-s1', 'completed', True),
  ]
  log = (out / 'def-r16-s1' / 'log.txt').read_text()
  assert 'def ratio 16 seed 1: 4 evals' in log
  assert '--config.seed=1' in log

  # The second time every run is finished: nothing is launched, and the
  # record of the sweep that ran them stays as it was.
  before = (out / 'sweep.json').read_bytes()
  assert run_sweep(fake, out, *args) == 0
  assert len(launches(fake[1])) == 4
  assert '4 runs, 4 finished, 0 to run' in capsys.readouterr().out
  assert (out / 'sweep.json').read_bytes() == before


def test_grids_sharing_an_out_keep_each_others_records(fake, tmp_path):
  """A queue adds a second seed to an --out later: the first grid's runs and
  command stay in sweep.json."""
  out = tmp_path / 'sweep'
  assert run_sweep(fake, out, '--methods', 'sgd', '--seeds', '0') == 0
  first = json.loads((out / 'sweep.json').read_text())['command']
  assert (
      run_sweep(
          fake, out, '--methods', 'sgd,ef', '--ratios', '4', '--seeds', '1'
      )
      == 0
  )
  record = json.loads((out / 'sweep.json').read_text())
  assert [r['name'] for r in record['runs']] == [
      'sgd-r1-s1',
      'ef-r4-s1',
      'sgd-r1-s0',
  ]
  assert record['earlier_commands'] == [first] and record['command'] != first
  # Rerunning the first grid (all finished) changes nothing.
  before = (out / 'sweep.json').read_bytes()
  assert run_sweep(fake, out, '--methods', 'sgd', '--seeds', '0') == 0
  assert (out / 'sweep.json').read_bytes() == before
  # Relaunching part of it neither duplicates runs nor commands.
  shutil.rmtree(out / 'sgd-r1-s1')
  assert (
      run_sweep(
          fake, out, '--methods', 'sgd,ef', '--ratios', '4', '--seeds', '1'
      )
      == 0
  )
  record = json.loads((out / 'sweep.json').read_text())
  assert sorted(r['name'] for r in record['runs']) == [
      'ef-r4-s1',
      'sgd-r1-s0',
      'sgd-r1-s1',
  ]
  assert record['earlier_commands'] == [first]


def test_unfinished_runs_are_relaunched(fake, tmp_path):
  out = tmp_path / 'sweep'
  args = (
      '--methods',
      'ef',
      '--ratios',
      '4,8',
      '--seeds',
      '0',
      '--set',
      'interrupt_once=1',
  )
  # Interrupted (exit code 4) is not a result: the sweep fails...
  assert run_sweep(fake, out, *args) == 1
  record = json.loads((out / 'sweep.json').read_text())
  assert [(r['status'], r['returncode']) for r in record['runs']] == [
      ('interrupted', 4),
      ('interrupted', 4),
  ]
  # ...and the same command resumes both runs.
  assert run_sweep(fake, out, *args) == 0
  assert launches(fake[1]) == ['ef-r4-s0', 'ef-r8-s0'] * 2
  log = (out / 'ef-r4-s0' / 'log.txt').read_text()
  assert log.count('$ ') == 2  # both attempts are logged


def test_divergence_is_a_result_and_failure_is_not(fake, tmp_path, capsys):
  out = tmp_path / 'sweep'
  assert run_sweep(fake, out, '--methods', 'ef', '--ratios', '16,1024') == 0
  record = json.loads((out / 'sweep.json').read_text())
  assert [r['status'] for r in record['runs']] == ['completed', 'diverged']

  out = tmp_path / 'crash'
  code = run_sweep(
      fake,
      out,
      '--methods',
      'sgd,ef,def',
      '--ratios',
      '16',
      '--set',
      'crash=ef',
  )
  assert code == 1
  record = json.loads((out / 'sweep.json').read_text())
  assert [
      (r['name'], r['status'], r['returncode']) for r in record['runs']
  ] == [
      ('sgd-r1-s0', 'completed', 0),
      ('ef-r16-s0', 'failed', 1),
      ('def-r16-s0', 'completed', 0),
  ]
  assert 'exit code 1' in capsys.readouterr().out
  # Relaunched, the failed run completes; the others keep what their launch
  # recorded (exit code, time), not "not launched".
  finished = {
      r['name']: r for r in record['runs'] if r['status'] == 'completed'
  }
  assert run_sweep(fake, out, '--methods', 'sgd,ef,def', '--ratios', '16') == 0
  record = json.loads((out / 'sweep.json').read_text())
  assert [r['status'] for r in record['runs']] == ['completed'] * 3
  for r in record['runs']:
    if r['name'] in finished:
      assert r == finished[r['name']]


def test_dry_run_launches_nothing(fake, tmp_path, capsys):
  out = tmp_path / 'sweep'
  assert (
      run_sweep(
          fake,
          out,
          '--methods',
          'def',
          '--ratios',
          '4',
          '--lams',
          '0.1,0.5',
          '--dry-run',
      )
      == 0
  )
  printed = capsys.readouterr().out
  assert printed.count('--config.optim.method=def') == 2
  assert '--config.optim.lam=0.5' in printed
  assert not out.exists() and not launches(fake[1])


def test_bad_paths_exit_2(fake, tmp_path):
  train, config = fake
  assert (
      sweep.main(
          [
              '--config',
              str(tmp_path / 'nope.py'),
              '--out',
              'o',
              '--methods',
              'ef',
              '--train',
              str(train),
          ]
      )
      == 2
  )
  assert (
      sweep.main(
          [
              '--config',
              str(config),
              '--out',
              'o',
              '--methods',
              'ef',
              '--train',
              str(tmp_path / 'nope.py'),
          ]
      )
      == 2
  )


# The report, on one sweep of the fake script.

SEEDS = (0, 1, 2)


@pytest.fixture(scope='module')
def swept(tmp_path_factory):
  """A finished fake sweep: every method, ratios 16 and 1024, two lams."""
  tmp = tmp_path_factory.mktemp('report')
  fake_files = make_fake(tmp)
  out = tmp / 'sweep'
  code = run_sweep(
      fake_files,
      out,
      '--methods',
      'sgd,ef,saef,psync,def',
      '--ratios',
      '16,1024',
      '--seeds',
      '0,1,2',
      '--lams',
      '0.2,0.3',
  )
  assert code == 0
  return out


def expected_cell(method, ratio, x=False, lam=0.3, seeds=SEEDS):
  values = [100 * fake_accuracy(method, ratio, lam, s, x) for s in seeds]
  return np.mean(values), np.std(values, ddof=1)


def test_table1_numbers(swept):
  summary = report.summarize([swept])
  table = summary['table1']
  assert summary['lam'] == 0.3  # two lams: the paper's default is shown
  assert summary['scale'] == 100.0
  assert set(table) == {'SGD', 'EF', 'SAEF', 'PSync', 'DEF', 'DEF-A'}
  assert list(table['SGD']) == [1]
  for label, method, x in [
      ('SGD', 'sgd', False),
      ('EF', 'ef', False),
      ('SAEF', 'saef', False),
      ('DEF', 'def', False),
      ('DEF-A', 'def', True),
  ]:
    ratio = 1 if label == 'SGD' else 16
    cell = table[label][ratio]
    mean, std = expected_cell(method, ratio, x)
    assert cell['n'] == 3 and cell['diverged'] == 0
    np.testing.assert_allclose([cell['mean'], cell['std']], [mean, std])
    assert cell['text'] == f'{mean:.2f} ± {std:.2f} (n=3)'
  # DEF-A is the def runs' x: not DEF's numbers.
  assert table['DEF-A'][16]['mean'] != table['DEF'][16]['mean']
  assert table['EF'][1024]['text'] == 'diverged'
  assert table['PSync'][1024]['text'] == 'diverged (1/3)'
  mean, _ = expected_cell('def', 1024, True)
  np.testing.assert_allclose(table['DEF-A'][1024]['mean'], mean)

  # Another lam for the table.
  cell = report.summarize([swept], lam=0.2)['table1']['DEF'][16]
  np.testing.assert_allclose(cell['mean'], expected_cell('def', 16, lam=0.2)[0])


def test_lam_table(swept):
  lams = report.summarize([swept])['lams']
  assert sorted(lams) == [16, 1024]
  assert sorted(lams[16]) == [0.2, 0.3]
  for lam in (0.2, 0.3):
    for label, x in (('DEF', False), ('DEF-A', True)):
      np.testing.assert_allclose(
          lams[16][lam][label]['mean'], expected_cell('def', 16, x, lam=lam)[0]
      )


def test_lam_table_shows_every_ratio_once_there_are_several_lams():
  cells = lambda a, b: {'DEF': {'text': a}, 'DEF-A': {'text': b}}
  text = report.table_lam_markdown(
      {
          'lams': {
              256: {0.3: cells('a', 'b'), 0.6: cells('c', 'd')},
              1024: {0.6: cells('e', 'f')},
          }
      }
  )
  assert (
      '| lam | 0.3 | 0.6 |\n|---|---:|---:|\n| DEF | a | c |\n| DEF-A | b | d |'
      in text
  )
  assert (
      'Compression ratio 1024:\n\n| lam | 0.6 |\n|---|---:|\n| DEF | e |\n| DEF-A | f |'
      in text
  )
  # One lam in all the runs: Table 1 says it all.
  assert (
      report.table_lam_markdown(
          {'lams': {256: {0.3: cells('a', 'b')}, 1024: {0.3: cells('e', 'f')}}}
      )
      is None
  )


def test_report_files(swept, tmp_path):
  out = tmp_path / 'report'
  assert report.main([str(swept), '--out', str(out)]) == 0
  table1 = (out / 'table1.md').read_text()
  lines = table1.splitlines()
  assert lines[0] == '| ratio | SGD | EF | SAEF | PSync | DEF | DEF-A |'
  sgd = expected_cell('sgd', 1)
  sgd_text = f'{sgd[0]:.2f} ± {sgd[1]:.2f} (n=3)'
  assert lines[2].startswith(f'| 1 | {sgd_text} | — |')
  assert lines[3].startswith('| 16 | — | ')
  assert '| 1024 | — | diverged | ' in lines[4]
  assert 'diverged (1/3)' in lines[4]
  assert 'lam = 0.3' in table1

  table_lam = (out / 'table_lam.md').read_text()
  assert '| lam | 0.2 | 0.3 |' in table_lam
  assert 'Compression ratio 1024' in table_lam

  for name in ('fig1_16.png', 'fig1_1024.png', 'fig3_16.png', 'fig3_1024.png'):
    data = (out / name).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000, name
  readme = (out / 'README.md').read_text()
  assert '![Figure 1 style, compression ratio 16](fig1_16.png)' in readme
  assert f'python -m defjax.report {swept} --out {out}' in readme
  assert 'sweep.json' in readme and 'ef-r1024-s0' in readme  # diverged list
  report_json = json.loads((out / 'report.json').read_text())
  assert len(report_json['runs']) == 3 + 3 * 2 * 3 + 2 * 2 * 3

  # Regenerating from the same runs gives the same bytes (committed reports
  # are checked this way), so no file may carry the time it was made.
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  assert report.main([str(swept), '--out', str(out)]) == 0
  after = {p.name: p.read_bytes() for p in out.iterdir()}
  assert after.keys() == before.keys()
  assert [n for n in before if before[n] != after[n]] == []


def test_fig3_stops_at_the_first_decay(swept):
  collected = results.collect([swept])
  until = figures.first_decay_epoch(
      collected.groups[('DEF', 16, collected.lam)]
  )
  assert until == 0.5 * 4  # decay_at[0] of num_epochs


def write_run(
    path,
    method,
    ratio,
    seed,
    status='completed',
    acc=0.5,
    acc_x=None,
    lam=0.3,
    lr=None,
):
  path.mkdir(parents=True)
  (path / 'metrics.jsonl').write_text(
      json.dumps(
          dict(
              step=1,
              epoch=1.0,
              train_loss=1.0,
              test_accuracy=acc,
              test_accuracy_x=acc_x,
              lr=0.1,
              wall_time=1.0,
              bytes_sent=0,
          )
      )
      + '\n'
  )
  if status != 'unfinished':
    (path / 'summary.json').write_text(
        json.dumps(
            dict(
                status=status,
                final_test_accuracy=acc,
                final_test_accuracy_x=acc_x,
                config=dict(
                    seed=seed,
                    optim=dict(method=method, ratio=ratio, lam=lam, lr=lr),
                ),
            )
        )
    )


def test_report_edge_cases(tmp_path):
  write_run(tmp_path / 'a', 'def', 64, 0, acc=0.70, acc_x=0.72)
  write_run(tmp_path / 'b', 'def', 64, 1, acc=0.74, acc_x=0.76)
  # A def_a run of seed 1 replaces the def run's x for that seed only.
  write_run(tmp_path / 'c', 'def_a', 64, 1, acc=0.80)
  # Unfinished: listed, not counted; its name alone tells what it is.
  (tmp_path / 'def-r64-lam0.3-s2').mkdir()
  (tmp_path / 'def-r64-lam0.3-s2' / 'metrics.jsonl').write_text(
      '{"step": 1, "test_accuracy": 0.1}\n{"step": 2, "test_acc'
  )
  summary = report.summarize([tmp_path])
  assert summary['unfinished'] == [
      results.shown(tmp_path / 'def-r64-lam0.3-s2')
  ]
  table = summary['table1']
  assert table['DEF'][64]['values'] == pytest.approx([70.0, 74.0])
  assert sorted(table['DEF-A'][64]['values']) == pytest.approx([72.0, 80.0])
  assert table['DEF-A'][64]['seeds'] == [0, 1]
  assert 'SGD' not in table

  # One seed: no std to show.
  write_run(tmp_path / 'sgd', 'sgd', 16, 0, acc=93.5)  # already in %
  summary = report.summarize([tmp_path / 'sgd'])
  assert summary['scale'] == 1.0
  assert summary['table1']['SGD'][1]['text'] == '93.50 (n=1)'

  assert (
      report.main([str(tmp_path / 'nothing'), '--out', str(tmp_path / 'r')])
      == 2
  )
  (tmp_path / 'empty').mkdir()
  assert (
      report.main([str(tmp_path / 'empty'), '--out', str(tmp_path / 'r')]) == 1
  )


def test_a_report_reads_the_same_from_any_checkout(tmp_path, monkeypatch):
  """Made from the checkout's root, as the committed reports are, a report
  names runs and sweeps relative to it: the same tree in another place gives
  the same bytes, with no path of the machine that made it."""
  outs = []
  for where in ('one', 'two'):
    runs = tmp_path / where / 'results' / 'runs'
    write_run(
        runs / 'def-r64-lam0.3-s0', 'def', 64, 0, status='diverged', acc=None
    )
    write_run(runs / 'sgd-r1-s0', 'sgd', 1, 0, acc=0.9)
    (runs / 'def-r64-lam0.3-s1').mkdir()  # unfinished
    (runs / 'def-r64-lam0.3-s1' / 'metrics.jsonl').write_text(
        '{"step": 1, "test_accuracy": 0.1}\n'
    )
    (runs / 'sweep.json').write_text(
        json.dumps({'command': 'python -m defjax.sweep', 'date': 'd'})
    )
    monkeypatch.chdir(tmp_path / where)
    assert report.main(['results/runs', '--out', 'results/report']) == 0
    outs.append(
        {
            p.name: p.read_bytes()
            for p in (tmp_path / where / 'results/report').iterdir()
        }
    )
  assert outs[0] == outs[1]
  text = outs[0]['README.md'].decode() + outs[0]['report.json'].decode()
  assert str(tmp_path) not in text
  assert '`results/runs/def-r64-lam0.3-s0` at step' in text  # diverged
  assert '`results/runs/def-r64-lam0.3-s1`' in text  # unfinished
  assert '- `results/runs/sweep.json`: `python -m defjax.sweep`' in text
  # Given as an absolute path, a run or sweep below the checkout is named
  # the same way (only the command line is quoted as typed).
  assert (
      report.main([str(tmp_path / 'two/results/runs'), '--out', 'results/abs'])
      == 0
  )
  text = (tmp_path / 'two/results/abs/README.md').read_text().split('```', 2)[2]
  assert str(tmp_path) not in text and '- `results/runs/sweep.json`' in text


def test_seeds_of_different_recipes_are_not_pooled(tmp_path):
  """EF at lr 0.05 (diverged) and at lr 0.01 (10%) from two folders are two
  experiments, not two seeds of one: grouping them is an error that names
  the setting that differs, not a 'diverged (1/2)' cell."""
  write_run(
      tmp_path / 'a' / 'ef-r256-s0',
      'ef',
      256,
      0,
      status='diverged',
      acc=None,
      lr=0.05,
  )
  write_run(tmp_path / 'b' / 'ef-r256-s0', 'ef', 256, 0, acc=0.1, lr=0.01)
  write_run(tmp_path / 'a' / 'sgd-r1-s0', 'sgd', 1, 0, acc=0.9, lr=0.05)
  with pytest.raises(
      ValueError, match=r'EF at ratio 256 .*optim\.lr 0\.05 vs 0\.01'
  ):
    results.collect([tmp_path / 'a', tmp_path / 'b'])
  assert (
      report.main(
          [
              str(tmp_path / 'a'),
              str(tmp_path / 'b'),
              '--out',
              str(tmp_path / 'r'),
          ]
      )
      == 2
  )
  # Each folder alone, or SGD at lr 0.05 beside EF at 0.01 (different
  # groups, the paper's Table 1 protocol), is fine.
  groups = results.collect(
      [tmp_path / 'b', tmp_path / 'a' / 'sgd-r1-s0']
  ).groups
  assert results.cell(groups[('EF', 256, None)], 100)['text'] == '10.00 (n=1)'
  assert results.cell(groups[('SGD', 1, None)], 100)['text'] == '90.00 (n=1)'
  assert (
      gap.main(
          [
              f'ef={tmp_path / "a"},{tmp_path / "b"}',
              '--out',
              str(tmp_path / 'g'),
          ]
      )
      == 2
  )
  assert not (tmp_path / 'g').exists()  # nothing written for a refused report
  assert (
      gap.main([f'ef={tmp_path / "nothing"}', '--out', str(tmp_path / 'g')])
      == 2
  )


def test_seeds_pool_across_config_forms_and_defaults(tmp_path):
  """A flat and a nested config of one recipe, and a config that lacks a key
  next to one that sets it to the value runs without it had, are seeds of
  one result; the same seed from two folders is refused."""
  write_run(tmp_path / 'a' / 'ef-r64-s0', 'ef', 64, 0, acc=0.80, lr=0.05)
  flat = tmp_path / 'b' / 'ef-r64-s1'
  write_run(flat, 'ef', 64, 1, acc=0.84)
  summary = json.loads((flat / 'summary.json').read_text())
  summary['config'] = {
      'seed': 1,
      'optim.method': 'ef',
      'optim.ratio': 64,
      'optim.lr': 0.05,
      'optim.per_leaf': False,
      'optim.decay_whole_epochs': False,
  }
  (flat / 'summary.json').write_text(json.dumps(summary))
  cell = results.cell(
      results.collect([tmp_path / 'a', tmp_path / 'b']).groups[
          ('EF', 64, None)
      ],
      100,
  )
  assert cell['text'] == '82.00 ± 2.83 (n=2)'
  # One run reached through two paths is read once.
  assert (
      results.collect([tmp_path / 'a', tmp_path / 'a' / 'ef-r64-s0'])
      .groups[('EF', 64, None)][0]
      .run.seed
      == 0
  )
  # Copied to a second folder: the same seed twice, not n=2.
  shutil.copytree(tmp_path / 'a', tmp_path / 'c')
  with pytest.raises(results.IncompatibleRunsError, match='seed 0 twice'):
    results.collect([tmp_path / 'a', tmp_path / 'c'])


@pytest.mark.slow
@pytest.mark.skipif(
    not (REPO_ROOT / 'train.py').exists(), reason='train.py is not written yet'
)
def test_real_sweep_and_report(tmp_path):
  """Two real runs of a few steps, then their report."""
  out = tmp_path / 'sweep'
  command = [
      sys.executable,
      '-m',
      'defjax.sweep',
      '--config',
      str(REPO_ROOT / 'configs' / 'fashion_mnist.py'),
      '--out',
      str(out),
      '--methods',
      'sgd,def',
      '--ratios',
      '4',
      '--seeds',
      '0',
      '--set',
      'num_train_steps=4',
  ]
  done = subprocess.run(
      command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
  )
  logs = '\n'.join(p.read_text() for p in out.glob('*/log.txt'))
  assert done.returncode == 0, shlex.join(command) + '\n' + done.stdout + logs
  for name in ('sgd-r1-s0', 'def-r4-s0'):
    summary = json.loads((out / name / 'summary.json').read_text())
    assert summary['status'] == 'completed'

  summary = report.write_report([out], tmp_path / 'report')
  assert set(summary['table1']) == {'SGD', 'DEF', 'DEF-A'}
  assert (
      '2 completed; finished 20'
      in (tmp_path / 'report' / 'README.md').read_text()
  )
  assert (tmp_path / 'report' / 'fig1_4.png').exists()


@pytest.mark.parametrize('page', ['README.md', 'docs/results.md'])
def test_results_tables_are_the_generated_ones(page):
  """Every table row in the README's Results section and on the results page
  is a row of a table that defjax.report (or defjax.gap) wrote into the
  results folder named last above it, as a link or a code span, or a report
  below it (no hand-typed accuracy, none pasted under the wrong dataset)."""
  import pathlib
  import re

  root = pathlib.Path(__file__).resolve().parent.parent
  text = (root / page).read_text()
  if page == 'README.md':
    text = text.split('\n## Results\n', 1)[1].split('\n## ', 1)[0]
  folder, checked, missing = None, 0, []
  for line in text.splitlines():
    named = re.findall(r'(?:\]\(|`)(?:\.\./)?(results/[^/)`]+)/', line)
    if named:
      folder = root / named[-1]
    row = line.strip()
    if not (
        row.startswith('|')
        and any(c.isdigit() for c in row)
        and not set(row) <= set('|-: ')
    ):
      continue
    assert (
        folder is not None
    ), f'a table before any results/ folder is named: {row}'
    generated = {
        l.strip()
        for path in folder.rglob('table*.md')
        for l in path.read_text().splitlines()
    }
    checked += 1
    if row not in generated:
      missing.append((folder.name, row))
  assert checked, f'no result tables in {page}'
  assert not missing, missing


def test_ef21_runs_are_named_grouped_and_reported(fake, tmp_path):
  """ef21_sgdm and ef21 runs: not repeated over --lams (their gradient is
  taken at x), read back from their names, and two columns after the
  paper's in Table 1 and the figures."""
  out = tmp_path / 'sweep'
  assert (
      run_sweep(
          fake,
          out,
          '--methods',
          'sgd,ef21_sgdm,ef21,def',
          '--ratios',
          '256',
          '--seeds',
          '0',
          '--lams',
          '0.3,0.6',
      )
      == 0
  )
  assert sorted(launches(fake[1])) == [
      'def-r256-lam0.3-s0',
      'def-r256-lam0.6-s0',
      'ef21-r256-s0',
      'ef21_sgdm-r256-s0',
      'sgd-r1-s0',
  ]
  for name in (
      'ef21_sgdm-r256-s0',
      'ef21-r256-s0',
  ):  # a run without summary: by its name
    (tmp_path / 'named' / name).mkdir(parents=True)
    shutil.copy(out / name / 'metrics.jsonl', tmp_path / 'named' / name)
  assert sorted(
      (r.method, r.ratio, r.lam, r.status)
      for r in results.collect([tmp_path / 'named']).runs
  ) == [
      ('ef21', 256, None, 'unfinished'),
      ('ef21_sgdm', 256, None, 'unfinished'),
  ]
  summary = report.write_report([out], tmp_path / 'report')
  table = (tmp_path / 'report' / 'table1.md').read_text().splitlines()
  assert table[0] == '| ratio | SGD | DEF | DEF-A | EF21-SGDM | EF21 |'
  for label, method in (('EF21-SGDM', 'ef21_sgdm'), ('EF21', 'ef21')):
    text = f'{100 * fake_accuracy(method, 256, 0.3, 0, False):.2f} (n=1)'
    assert summary['table1'][label][256]['text'] == text
  assert (tmp_path / 'report' / 'fig1_256.png').read_bytes()[:8] == PNG_MAGIC


def test_gap_report_is_sgd_minus_method_against_sends_per_value(fake, tmp_path):
  """The gap-vs-length table: SGD's mean minus DEF's (and DEF-A's) mean over
  seeds, at T / ratio; a setting may borrow its SGD run from another folder."""
  out = tmp_path / 'sweep'
  assert (
      run_sweep(
          fake,
          out,
          '--methods',
          'sgd,def',
          '--ratios',
          '64,256',
          '--seeds',
          '0,1',
      )
      == 0
  )
  lam_out = tmp_path / 'lam'
  assert (
      run_sweep(
          fake,
          lam_out,
          '--methods',
          'def',
          '--ratios',
          '256',
          '--seeds',
          '0',
          '--lams',
          '0.6',
      )
      == 0
  )
  rows = gap.write(
      [('short', [str(out)]), ('lam', [str(lam_out), str(out / 'sgd-r1-s0')])],
      tmp_path / 'gap',
      ['python', '-m', 'defjax.gap'],
  )
  by_key = {(r['setting'], r['method'], r['ratio'], r['lam']): r for r in rows}
  sgd = np.mean([100 * fake_accuracy('sgd', 1, 0.3, s, False) for s in (0, 1)])
  for ratio in (64, 256):
    for label, x in (('DEF', False), ('DEF-A', True)):
      row = by_key[('short', label, ratio, 0.3)]
      want = np.mean(
          [100 * fake_accuracy('def', ratio, 0.3, s, x) for s in (0, 1)]
      )
      assert row['gap'] == pytest.approx(sgd - want)
      assert row['steps'] == 40 and row['sends_per_value'] == 40 / ratio
  row = by_key[('lam', 'DEF', 256, 0.6)]
  assert row['gap'] == pytest.approx(
      100
      * (
          fake_accuracy('sgd', 1, 0.3, 0, False)
          - fake_accuracy('def', 256, 0.6, 0, False)
      )
  )
  assert (tmp_path / 'gap' / 'gap.png').read_bytes()[:8] == PNG_MAGIC
  table = (tmp_path / 'gap' / 'table_gap.md').read_text()
  assert table.count('\n') == 2 + len(rows)


def test_verdict_table_puts_every_method_side_by_side(fake, tmp_path):
  """A row per (ratio, DEF's lam): EF, SAEF and EF21-SGDM (lam fixed) in
  each lam's row, a method without runs is a dash."""
  out = tmp_path / 'sweep'
  assert (
      run_sweep(
          fake,
          out,
          '--methods',
          'sgd,ef,saef,def,ef21_sgdm',
          '--ratios',
          '64',
          '--seeds',
          '0',
          '--lams',
          '0.3,0.6',
      )
      == 0
  )
  rows = gap.verdict_rows_of('s', [str(out)])
  text = (
      lambda method, lam=0.3, x=False: f'{100 * fake_accuracy(method, 64, lam, 0, x):.2f} (n=1)'
  )
  assert [(r['ratio'], r['lam']) for r in rows] == [(64, 0.3), (64, 0.6)]
  for r, lam in zip(rows, (0.3, 0.6)):
    assert (
        r['SGD'] == f'{100 * fake_accuracy("sgd", 1, 0.3, 0, False):.2f} (n=1)'
    )
    assert (r['DEF'], r['DEF-A']) == (
        text('def', lam),
        text('def', lam, x=True),
    )
    assert (r['EF'], r['SAEF'], r['PSync'], r['EF21-SGDM']) == (
        text('ef'),
        text('saef'),
        None,
        text('ef21_sgdm'),
    )
    assert r['steps'] == 40 and r['sends_per_value'] == 40 / 64
  # A ratio where every run diverged (EF at 1024 stops at step 20 of 40)
  # still shows the setting's T, not where the runs stopped.
  assert (
      run_sweep(
          fake, out, '--methods', 'ef', '--ratios', '1024', '--seeds', '0'
      )
      == 0
  )
  row = [r for r in gap.verdict_rows_of('s', [str(out)]) if r['ratio'] == 1024][
      0
  ]
  assert (
      row['EF'] == 'diverged'
      and row['steps'] == 40
      and row['sends_per_value'] == 40 / 1024
  )
  table = gap.verdict_markdown(rows).splitlines()
  assert table[0].startswith(
      '| setting | layout | ratio | steps T | T / ratio | SGD | DEF |'
  )
  assert table[0].endswith('| EF | SAEF | PSync | EF21-SGDM |')
  assert table[3].endswith(
      f'| 0.6 | {text("ef")} | {text("saef")} | — | {text("ef21_sgdm")} |'
  )
