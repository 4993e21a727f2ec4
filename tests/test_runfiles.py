"""A run's own record (run.json) and the provenance it carries."""

import json
import subprocess

import pytest

from defjax.training import runfiles


class _Stopped(Exception):
  status = 'interrupted'
  step = 7


def test_each_invocation_is_appended_with_its_end(tmp_path):
  with runfiles.Invocation(tmp_path, 0, 10):
    [entry] = runfiles.read_invocations(tmp_path)
    assert entry['status'] == 'running' and 'ended' not in entry
  with pytest.raises(_Stopped):
    with runfiles.Invocation(tmp_path, 10, 20):
      raise _Stopped
  with pytest.raises(KeyError):
    with runfiles.Invocation(tmp_path, 7, 20):
      raise KeyError('boom')
  with runfiles.Invocation(tmp_path, 7, 20, enabled=False):
    pass  # another process of a multi-host run writes nothing
  done, stopped, failed = runfiles.read_invocations(tmp_path)
  assert (done['status'], done['start_step'], done['end_step']) == (
      'completed',
      0,
      10,
  )
  assert (stopped['status'], stopped['start_step'], stopped['end_step']) == (
      'interrupted',
      10,
      7,
  )
  assert (failed['status'], failed['end_step']) == ('failed', None)
  assert (
      json.loads((tmp_path / runfiles.RECORD).read_text())['invocations'][0]
      == done
  )


def test_an_invocation_that_never_left_is_marked_killed_by_the_next(tmp_path):
  killed = runfiles.Invocation(tmp_path, 0, 30).__enter__()  # no __exit__
  del killed
  with runfiles.Invocation(tmp_path, 20, 30):
    first, second = runfiles.read_invocations(tmp_path)
    # killed between its checkpoints at 20 and 30: the run keeps up to 20
    assert (first['status'], first['end_step']) == ('killed', 20)
    assert 'ended' not in first and second['status'] == 'running'
  assert [e['status'] for e in runfiles.read_invocations(tmp_path)] == [
      'killed',
      'completed',
  ]


def test_git_state_records_a_dirty_tree_with_its_diff(tmp_path):
  git = lambda *a: subprocess.run(
      ['git', '-C', str(tmp_path), *a],
      check=True,
      capture_output=True,
      text=True,
  ).stdout
  git('init', '-q')
  (tmp_path / 'code.py').write_text('a = 1\n')
  git('add', 'code.py')
  git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'one')
  clean = runfiles.git_state(tmp_path, diff=True)
  assert clean == {'commit': git('rev-parse', 'HEAD').strip(), 'dirty': False}
  (tmp_path / 'code.py').write_text('a = 2\n')
  (tmp_path / 'new.py').write_text('')
  dirty = runfiles.git_state(tmp_path, diff=True)
  assert dirty['dirty'] and dirty['commit'] == clean['commit']
  assert '-a = 1\n+a = 2' in dirty['diff'] and dirty['untracked'] == ['new.py']
  assert 'diff' not in runfiles.git_state(tmp_path)


def test_outside_a_checkout_the_commit_is_unknown(tmp_path):
  if (
      subprocess.run(
          ['git', '-C', str(tmp_path), 'rev-parse'], capture_output=True
      ).returncode
      == 0
  ):
    pytest.skip("pytest's temporary directory lies inside a git checkout")
  assert runfiles.git_state(tmp_path) == {'commit': None, 'dirty': None}
