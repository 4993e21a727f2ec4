"""The slow-link benchmark's machinery: namespaces, the two-host runner, the
byte formulas and the projection check (no timing is asserted)."""

import pytest

from bench import netns
from bench import slow_link

REASON = netns.unavailable()
needs_netns = pytest.mark.skipif(
    REASON is not None, reason=f'slow link: {REASON}'
)


def test_rates_and_wire_bytes():
  assert netns.bits_per_s('100mbit') == 1e8 and netns.bits_per_s('1gbit') == 1e9
  assert netns.bits_per_s(None) is None
  with pytest.raises(ValueError, match='gbit, mbit or kbit'):
    netns.bits_per_s('100MB')
  assert netns.qdisc_args(None)[0] == 'pfifo'
  tbf = netns.qdisc_args('1gbit')
  assert (
      tbf[:3] == ['tbf', 'rate', '1gbit']
      and int(tbf[4]) == netns.BURST_BYTES == 16384
  )
  assert netns.wire_bytes(1448) == 1514
  # Gloo's ring: one edge crosses the link each way, 2 (P - 1) / P of n.
  assert slow_link.ring_link_bytes(1000, 2) == 1000
  assert slow_link.ring_link_bytes(800, 8) == 1400
  assert slow_link.ring_link_bytes(800, 1) == 0


@needs_netns
def test_link_isolates_two_namespaces_and_counts_what_crosses():
  import subprocess
  import sys

  with netns.Link('10mbit') as link:
    ns = subprocess.run(
        ['ip', 'netns', 'list'], capture_output=True, text=True
    ).stdout
    assert all(name in ns for name in link.namespaces)
    before = link.sent_bytes()
    code = (
        'import socket; s = socket.create_connection(("%s", 9)); '
        % netns.ADDRESSES[1]
    )
    # Nothing listens on host 1's port 9: the SYN and its RST cross the veth,
    # nothing else does.
    subprocess.run(
        link.command(0, [sys.executable, '-c', code]), capture_output=True
    )
    after = link.sent_bytes()
    assert after[0] > before[0] and after[1] > before[1]
    hosts = subprocess.run(
        link.command(1, ['cat', '/etc/hosts']), capture_output=True, text=True
    ).stdout
    assert f'{netns.ADDRESSES[1]} {link.hostname}' in hosts
  ns = subprocess.run(
      ['ip', 'netns', 'list'], capture_output=True, text=True
  ).stdout
  assert not any(name in ns for name in link.namespaces)


@needs_netns
@pytest.mark.stress
def test_two_hosts_train_across_a_throttled_link_and_count_its_bytes():
  """Two jax.distributed processes in their own namespaces run SGD and DEF
  steps across a 10 Mbit/s veth; SGD's bytes on the link are the formula's
  (payload dominated), DEF's a small fraction of them."""
  w0, w1 = slow_link.run_on_link(
      'bench.slow_link',
      [
          '--model',
          'cnn',
          '--variants',
          'sgd,def@64',
          '--rates',
          f'{slow_link.UNTHROTTLED},10mbit',
          '--rounds',
          '1',
          '--steps',
          '1',
      ],
      timeout_s=400,
  )
  assert w0['workers'] == 2 and w0['allreduce_operands']['sgd'] > 1
  for rate in (slow_link.UNTHROTTLED, '10mbit'):
    for w in (w0, w1):
      sgd, def64 = w['sent'][rate]['sgd'][0], w['sent'][rate]['def@64'][0]
      formula = netns.wire_bytes(w0['formula_payload_bytes']['sgd'])
      assert 0.99 < sgd / formula < 1.1, (rate, sgd, formula)
      assert def64 < sgd / 10
  rows = slow_link.rows_of([w0, w1], 'cnn M=1 jax')
  assert {(r['rate'], r['variant']) for r in rows} == {
      (rate, v)
      for rate in (slow_link.UNTHROTTLED, '10mbit')
      for v in ('sgd', 'def@64')
  }


def _fake_results(step_s, sent, payload, operands, workers=2):
  """Both workers' JSON as the workers write it, from per-variant numbers."""
  w = {
      'step_s': step_s,
      'sent': sent,
      'workers': workers,
      'formula_payload_bytes': {
          n: slow_link.ring_link_bytes(b, workers) for n, b in payload.items()
      },
      'allreduce_bytes': {n: [b] for n, b in payload.items()},
      'allreduce_operands': operands,
      'd': 1000,
  }
  return [w, w]


def test_message_model_and_projection_recover_what_made_the_data():
  """Bytes made as payload x headers + 500 bytes per crossing message and
  step times made as unthrottled + bytes / (0.9 rate): the fit finds 500 and
  0.9, and the corrected model is exact at the rates it was not fitted to."""
  payload = {'sgd': 4_000_000, 'def@64': 62_500, 'def@256': 15_625}
  operands = {'sgd': 30, 'def@64': 10, 'def@256': 10}
  rates = {'none': None, '1gbit': 1e9, '100mbit': 1e8, '10mbit': 1e7}
  base = {'sgd': 0.5, 'def@64': 0.3, 'def@256': 0.29}

  def wire(n):
    return netns.wire_bytes(payload[n]) + 500 * 2 * operands[n]

  step_s = {
      r: {
          n: [base[n] + (wire(n) / (0.9 * bps / 8) if bps else 0.0)]
          for n in payload
      }
      for r, bps in rates.items()
  }
  sent = {r: {n: [wire(n)] for n in payload} for r in rates}
  measured = {
      'vgg16 M=1': {'jax': _fake_results(step_s, sent, payload, operands)}
  }
  message = slow_link.fit_message_bytes(measured)
  assert message['bytes_per_message'] == pytest.approx(500)
  check = slow_link.projection_check(measured, message)
  assert check['eta'] == pytest.approx(0.9)
  assert check['max_held_out_error'] == pytest.approx(0, abs=1e-9)
  rows = {(r['rate'], r['variant']): r for r in check['rows']}
  assert (
      rows['1gbit', 'sgd']['model_error'] < 0
  )  # the raw model ignores headers, messages, eta
  assert (
      not rows['10mbit', 'sgd']['fitted_here']
      and rows['100mbit', 'sgd']['fitted_here']
  )
  table = slow_link.rows_of(measured['vgg16 M=1']['jax'], 'vgg16 M=1 jax')
  slow_link.add_message_model(table, measured, message)
  assert all(r['measured_vs_with_messages'] == pytest.approx(1) for r in table)
  by = {(r['rate'], r['variant']): r for r in table}
  assert by['10mbit', 'sgd']['link_added_ms'] == pytest.approx(
      1e3 * wire('sgd') / (0.9 * 1.25e6)
  )
  assert by['10mbit', 'def@256']['speedup'] == pytest.approx(
      step_s['10mbit']['sgd'][0] / step_s['10mbit']['def@256'][0]
  )
