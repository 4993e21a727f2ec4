"""Two hosts on one machine: network namespaces joined by a throttled link.

``Link`` makes two network namespaces, each with its own loopback, joined by
a veth pair (one end in each, addresses ``ADDRESSES``). Each end's egress
goes through a queueing discipline that the benchmark sets and reads:

* a token-bucket filter (``tc ... tbf rate R``) caps what that end sends at
  R, so each direction of the link carries at most R, as on a real
  full-duplex link (a throttled loopback shared by two processes counts both
  directions against one bucket instead), with a bucket of 16 KB so that
  short transfers pay the rate too (``BURST_BYTES``);
* unthrottled, a plain FIFO, which only counts.

Traffic between the devices of one process stays on that namespace's own
loopback (XLA:CPU makes every device its own gloo rank over TCP, also inside
one process); only traffic between the two processes crosses the veth.

The qdisc's byte counter is what crossed the wire: every TCP segment with its
headers (Ethernet 14 + IPv4 20 + TCP 32 with timestamps), also for the large
segments that the stack hands to the device in one piece (GSO), which the
device's own counter in /proc/net/dev counts without the per-segment headers.

Gloo (XLA:CPU's and PyTorch's CPU collectives) advertises the address that
the machine's hostname resolves to (127.0.0.1 on many machines, which the
other namespace cannot reach). ``ip netns exec NAME`` bind-mounts
``/etc/netns/NAME/hosts`` over ``/etc/hosts``, so each namespace gets a hosts
file that maps the hostname to its own veth address.

Needs Linux, root, ``ip`` and ``tc`` (iproute2); ``unavailable()`` says why
not where any is missing. No JAX import here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from typing import Optional, Sequence

ADDRESSES = ('10.77.0.1', '10.77.0.2')
# The bucket: what may leave at the veth's own speed before the rate applies.
# It refills while a step computes, so a bucket larger than a compressed
# step's traffic lets that traffic cross for free: with 256 KB, 100 KB took
# 0.4 ms at 10 Mbit/s (line rate: 84 ms), and DEF's block never paid the
# link. A real link serialises every byte at its rate; 16 KB (about 11
# full segments) is what tbf needs here to reach 1 Gbit/s (8.6 ms for 1 MB,
# line rate 8.4) while 100 KB at 10 Mbit/s takes 71 ms. The veth's large
# (GSO) packets are cut to segments by tbf; a bucket smaller than one packet
# would drop them (on loopback, whose MTU is 64 KiB, TCP stalled with 64kb).
BURST_BYTES = 16 * 1024
# How long a packet may wait in the bucket's queue before it is dropped.
QUEUE_LATENCY = '2000ms'
# Bytes on the wire per TCP segment beyond its payload (Ethernet 14, IPv4 20,
# TCP 20 + 12 of timestamps), and the payload of a full segment at MTU 1500.
HEADER_BYTES = 66
MSS = 1448


def unavailable() -> Optional[str]:
  """None where ``Link`` can run here, else the reason it cannot."""
  if not hasattr(os, 'geteuid') or os.geteuid() != 0:
    return 'network namespaces need root'
  for tool in ('ip', 'tc'):
    if shutil.which(tool) is None:
      return f'{tool} (iproute2) is not installed'
  name = f'dj{os.getpid()}probe'
  try:
    _run('ip', 'netns', 'add', name)
  except RuntimeError as e:
    return f'cannot create a network namespace: {e}'
  try:
    _run(
        'ip',
        'link',
        'add',
        f'dj{os.getpid()}p',
        'netns',
        name,
        'type',
        'veth',
        'peer',
        'name',
        'peer0',
        'netns',
        name,
    )
    _run(
        'tc',
        '-n',
        name,
        'qdisc',
        'add',
        'dev',
        f'dj{os.getpid()}p',
        'root',
        'tbf',
        'rate',
        '1mbit',
        'burst',
        '256kb',
        'latency',
        QUEUE_LATENCY,
    )
  except RuntimeError as e:
    return f'cannot make a throttled veth pair: {e}'
  finally:
    _run('ip', 'netns', 'del', name, check=False)
  return None


def bits_per_s(rate: Optional[str]) -> Optional[float]:
  """'100mbit' -> 1e8; None (unthrottled) -> None."""
  if rate is None:
    return None
  units = {'gbit': 1e9, 'mbit': 1e6, 'kbit': 1e3, 'bit': 1.0}
  for suffix, scale in units.items():
    if rate.endswith(suffix):
      return float(rate[: -len(suffix)]) * scale
  raise ValueError(f'rate {rate!r}: expected a number with gbit, mbit or kbit')


def qdisc_args(rate: Optional[str]) -> list[str]:
  """The root qdisc for ``rate``: a token bucket, or a counting FIFO."""
  if rate is None:
    return ['pfifo', 'limit', '10000']
  bits_per_s(rate)  # a rate tc can read
  return [
      'tbf',
      'rate',
      rate,
      'burst',
      str(BURST_BYTES),
      'latency',
      QUEUE_LATENCY,
  ]


def set_rate(
    dev: str, rate: Optional[str], netns: Optional[str] = None
) -> None:
  """Caps ``dev``'s egress at ``rate`` (None: unthrottled). ``netns``: the
  namespace holding ``dev``, when called from outside it."""
  where = ['-n', netns] if netns else []
  _run('tc', *where, 'qdisc', 'replace', 'dev', dev, 'root', *qdisc_args(rate))


def sent_bytes(dev: str, netns: Optional[str] = None) -> int:
  """Bytes ``dev``'s root qdisc has sent (headers included) since it was set."""
  where = ['-n', netns] if netns else []
  out = _run('tc', *where, '-s', '-j', 'qdisc', 'show', 'dev', dev, 'root')
  [qdisc] = [q for q in json.loads(out) if q.get('root')] or [None]
  if qdisc is None:
    raise RuntimeError(f'no root qdisc on {dev}')
  return int(qdisc['bytes'])


def retransmitted() -> int:
  """TCP segments this network namespace has retransmitted (/proc/net/snmp,
  as seen from inside the namespace)."""
  with open('/proc/net/snmp') as f:
    header, values = [line.split() for line in f if line.startswith('Tcp:')][:2]
  return int(values[header.index('RetransSegs')])


def wire_bytes(payload_bytes: float, mss: int = MSS) -> float:
  """What ``payload_bytes`` of TCP payload occupy on the wire: one header of
  ``HEADER_BYTES`` per full segment of ``mss`` (the formula the benchmark
  compares the counted bytes with; acknowledgements and the collectives' own
  message headers are left out)."""
  return payload_bytes * (mss + HEADER_BYTES) / mss


class Link:
  """Two namespaces joined by a veth pair; ``with Link() as link:``.

  ``link.namespaces[i]``, ``link.devices[i]`` and ``ADDRESSES[i]`` are host
  i's namespace, its end of the link and its address; ``link.command(i,
  argv)`` runs ``argv`` in host i's namespace. Removed on exit.
  """

  def __init__(self, rate: Optional[str] = None, tag: str | None = None):
    tag = tag or str(os.getpid())
    self.namespaces = (f'dj{tag}h0', f'dj{tag}h1')
    self.devices = (f'dj{tag}v0', f'dj{tag}v1')
    self.rate = rate
    self.hostname = socket.gethostname()

  def __enter__(self):
    try:
      for ns, dev, addr in zip(self.namespaces, self.devices, ADDRESSES):
        _run('ip', 'netns', 'add', ns)
        hosts = f'/etc/netns/{ns}'
        os.makedirs(hosts, exist_ok=True)
        with open(f'{hosts}/hosts', 'w') as f:
          f.write(f'127.0.0.1 localhost\n{addr} {self.hostname}\n')
      _run(
          'ip',
          'link',
          'add',
          self.devices[0],
          'netns',
          self.namespaces[0],
          'type',
          'veth',
          'peer',
          'name',
          self.devices[1],
          'netns',
          self.namespaces[1],
      )
      for ns, dev, addr in zip(self.namespaces, self.devices, ADDRESSES):
        _run('ip', '-n', ns, 'addr', 'add', f'{addr}/24', 'dev', dev)
        _run('ip', '-n', ns, 'link', 'set', dev, 'up')
        _run('ip', '-n', ns, 'link', 'set', 'lo', 'up')
        set_rate(dev, self.rate, ns)
    except BaseException:
      self.close()
      raise
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self) -> None:
    for ns in self.namespaces:
      _run('ip', 'netns', 'del', ns, check=False)  # takes its veth end along
      shutil.rmtree(f'/etc/netns/{ns}', ignore_errors=True)

  def command(self, host: int, argv: Sequence[str]) -> list[str]:
    return ['ip', 'netns', 'exec', self.namespaces[host], *argv]

  def set_rate(self, rate: Optional[str]) -> None:
    for ns, dev in zip(self.namespaces, self.devices):
      set_rate(dev, rate, ns)
    self.rate = rate

  def sent_bytes(self) -> tuple[int, int]:
    """Bytes each end has sent since its rate was last set."""
    return tuple(
        sent_bytes(dev, ns) for ns, dev in zip(self.namespaces, self.devices)
    )


def _run(*argv: str, check: bool = True) -> str:
  proc = subprocess.run(argv, capture_output=True, text=True)
  if check and proc.returncode != 0:
    raise RuntimeError(
        f'{" ".join(argv)}: {(proc.stderr or proc.stdout).strip()}'
    )
  return proc.stdout
