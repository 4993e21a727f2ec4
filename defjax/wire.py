"""What crosses the wire: collectives read from compiled HLO.

The claim "only the b block values are all-reduced" is checked on the
program XLA actually runs, not on the Python source: ``collectives`` parses
the optimized HLO of a compiled step and lists every cross-device collective
with its payload; ``transfers`` adds which mesh axes each one's device groups
span (on a ('data', 'model') mesh: across workers, inside a worker, or both).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

_COLLECTIVES = (
    'all-reduce',
    'all-reduce-start',
    'all-gather',
    'all-gather-start',
    'reduce-scatter',
    'all-to-all',
    'collective-permute',
    'collective-permute-start',
)
_DTYPE_BYTES = {
    'pred': 1,
    's8': 1,
    'u8': 1,
    's16': 2,
    'u16': 2,
    'f16': 2,
    'bf16': 2,
    's32': 4,
    'u32': 4,
    'f32': 4,
    's64': 8,
    'u64': 8,
    'f64': 8,
}
_SHAPE = re.compile(r'\b(pred|[suf]\d+|bf16)\[([\d,]*)\]')
_OP = re.compile(
    r'=\s*(?P<result>\(.*?\)|\S+)\s+(?P<op>'
    + '|'.join(
        re.escape(c) for c in sorted(_COLLECTIVES, key=len, reverse=True)
    )
    + r')\('
)


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a compiled program and the arrays it produces."""

  op: str
  shapes: tuple[tuple[str, tuple[int, ...]], ...]

  @property
  def elements(self) -> int:
    return sum(math.prod(s) for _, s in self.shapes)

  @property
  def bytes(self) -> int:
    return sum(self.operand_bytes)

  @property
  def operand_bytes(self) -> tuple[int, ...]:
    """Bytes of each array, one by one: XLA:CPU runs a combined (tuple)
    all-reduce as one gloo all-reduce per operand, each with its own messages.
    """
    return tuple(math.prod(s) * _DTYPE_BYTES[t] for t, s in self.shapes)


def shapes(hlo_type: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
  """(dtype, dims) of every array in an HLO type, e.g. ``(f32[3,4]{1,0}, s32[])``."""
  return tuple(
      (t, tuple(int(x) for x in dims.split(',') if x))
      for t, dims in _SHAPE.findall(hlo_type)
  )


def array_bytes(hlo_type: str) -> int:
  """Bytes of the arrays of an HLO type (what an instruction produces)."""
  return sum(math.prod(s) * _DTYPE_BYTES[t] for t, s in shapes(hlo_type))


def _hlo_text(compiled) -> str:
  if isinstance(compiled, str):
    return compiled
  return compiled.as_text()


def collectives(compiled) -> list[Collective]:
  """Every cross-device collective in a compiled program (or its HLO text).

  ``*-done`` halves of async pairs are skipped so each transfer counts once;
  a combined (tuple) all-reduce counts all of its operands.
  """
  found = []
  for line in _hlo_text(compiled).splitlines():
    m = _OP.search(line)
    if not m:
      continue
    result = m.group('result')
    produced = shapes(result)
    op = m.group('op').removesuffix('-start')
    if (
        op.startswith('all-reduce')
        and result.startswith('(')
        and m.group('op').endswith('-start')
    ):
      # all-reduce-start returns the operands then the results: count once.
      if len(produced) > 1 and len(produced) % 2 == 0:
        produced = produced[: len(produced) // 2]
    found.append(Collective(op=op, shapes=produced))
  return found


_GROUPS_LIST = re.compile(r'replica_groups=\{((?:\{[\d,]*\},?)*)\}')
_GROUPS_IOTA = re.compile(
    r'replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?'
)


def replica_groups(line: str, num_devices: int) -> list[list[int]]:
  """The device groups of one HLO collective line (explicit or iota form)."""
  m = _GROUPS_IOTA.search(line)
  if m:
    groups, size = int(m.group(1)), int(m.group(2))
    dims = [int(d) for d in m.group(3).split(',')]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(4):
      ids = ids.transpose([int(p) for p in m.group(4).split(',')])
    return ids.reshape(groups, size).tolist()
  m = _GROUPS_LIST.search(line)
  if m:
    groups = [
        [int(i) for i in g.split(',') if i]
        for g in re.findall(r'\{([\d,]*)\}', m.group(1))
    ]
    groups = [g for g in groups if g]
    if groups:
      return groups
  return [list(range(num_devices))]  # replica_groups={} (or absent): everyone


@dataclasses.dataclass(frozen=True)
class Transfer:
  """One collective of a compiled program and the mesh axes its groups span."""

  collective: Collective
  axes: tuple[str, ...]

  def spans(self, axis: str) -> bool:
    """Whether some group of this collective has devices at two positions on ``axis``."""
    return axis in self.axes


def transfers(compiled, mesh) -> list[Transfer]:
  """Every collective of a program compiled on ``mesh``, with the axes it spans.

  Device ids in the groups are positions in the mesh (the program's device
  assignment), row-major over ``mesh.axis_names``.

  Args:
    compiled: a compiled program or its HLO text.
    mesh: the ``jax.sharding.Mesh`` it was compiled for (anything with an
      ordered ``shape`` mapping axis names to sizes).
  """
  names, sizes = tuple(mesh.shape), tuple(mesh.shape.values())
  out = []
  for line in _hlo_text(compiled).splitlines():
    found = collectives(line)
    if not found:
      continue
    spanned = set()
    for group in replica_groups(line, math.prod(sizes)):
      coords = np.unravel_index(np.asarray(group), sizes)
      spanned |= {n for n, c in zip(names, coords) if len(set(c.tolist())) > 1}
    out.append(Transfer(found[0], tuple(n for n in names if n in spanned)))
  return out


def payload_bytes(compiled) -> int:
  """Total bytes produced by the collectives of one run of the program."""
  return int(np.sum([c.bytes for c in collectives(compiled)], dtype=np.int64))


def bytes_per_step(
    payload: int, model_state: int = 0, *, bytes_per_value: int = 4
) -> int:
  """Bytes one worker all-reduces per step, as the compiled step does.

  ``payload`` values of the update (the RBGS blocks; all d for SGD), the
  ``model_state`` values synced every step (batch-norm statistics) and the
  mean loss. ``bench/wire_bytes.py`` checks this against the HLO.
  """
  return bytes_per_value * (payload + model_state + 1)
