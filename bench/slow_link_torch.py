r"""PyTorch DDP peers on the slow link: the torch side of ``bench.slow_link``.

Two processes, one per host of ``bench.netns.Link``, each one pinned core and
one thread, joined by ``torch.distributed`` over gloo (bound to the veth end
by ``GLOO_SOCKET_IFNAME``), train the DEF authors' VGG-16 (or its quarter-
width ``vgg16_slim``) on random data, whole steps (forward, loss, backward
with DDP's communication, SGD with momentum 0.9 and weight decay 5e-4), timed
by ``slow_link.time_rounds`` in the same rounds as the jax workers. Variants,
each its own model copy, DDP instance and optimizer:

* ``ddp``: DDP without a hook (all-reduce of the float32 gradient);
* ``powersgd@r`` (r = 1, 4): DDP with ``powerSGD_hook``, rank r, error
  feedback and warm start, compressing from step ``START_POWERSGD_ITER`` on;
* ``fp16``: DDP with ``fp16_compress_hook`` (the gradient all-reduced as
  float16).

Every DDP puts the whole model in one bucket (``bucket_cap_mb`` above its
size): over gloo, PowerSGD with several buckets aborts with "Received data
size doesn't match expected size". Before ``time_rounds`` each variant runs
``WARM_STEPS`` untimed steps, so that every timed step is a compressed one.

Bytes on the link, written from the model before measuring (``plan``); P = 2
ranks, f = 4 bytes a float32, per step:

  all-reduce: ProcessGroupGloo's CPU all-reduce calls ``gloo::allreduce``
    with no algorithm set, which gloo runs as its ring (reduce-scatter, then
    all-gather, in segments of at most 1 MiB; the installed libtorch_cpu.so
    holds gloo/allreduce.cc's ``ring``, and no shared-memory path): 2 (P -
    1) / P n = n bytes each way for n bytes per rank
    (``slow_link.ring_link_bytes``);
  ddp: one all-reduce of the bucket, n = f d;
  fp16: one all-reduce of n = 2 d;
  powersgd@r: three all-reduces, chained: the uncompressed tensors as one
    batch, then all Ps, then all Qs. The hook views each gradient as a matrix
    n_t x m_t (its first dimension by the rest; a 1-D tensor is n_t x 1),
    takes r_t = min(n_t, m_t, r) and compresses it when (n_t + m_t) r_t
    min_compression_rate < n_t m_t (default rate 2): so every 1-D tensor
    (conv and Linear biases, BN weights and biases) goes uncompressed, every
    conv and Linear weight is compressed here. n = f sum n_t m_t
    (uncompressed), f sum n_t r_t (P), f sum m_t r_t (Q);
  buffers: DDP's broadcast_buffers (the default) broadcasts the BN buffers
    from rank 0 before every forward, one broadcast per dtype (float32
    running means and variances, int64 num_batches_tracked; gloo's binomial
    tree is one send for P = 2), host 0 to host 1 only.

So the direction 0 -> 1 carries the all-reduces plus the buffers and 1 -> 0
the all-reduces alone; ``formula_payload_bytes`` is the direction 0 -> 1,
the larger (``slow_link.rows_of`` compares it with the larger measured
direction), ``formula_payload_bytes_by_direction`` both.

Payload only, as on the jax side: ``netns.wire_bytes`` adds the TCP headers;
left out are the per-message costs (gloo's message headers and receive-ready
notices, acknowledgements that ride on no data), which scale with the number
of collectives per step, ``allreduce_operands`` and ``broadcast_operands``
(the ring cuts each all-reduce into max(2 P, ceil(n / 1 MiB)) segments,
rounded up to a multiple of P, each a message). A probe of bare
``dist.all_reduce`` / ``dist.broadcast`` on the link (2 December 2026,
unthrottled, loaded machine) found about 1.4-1.6 KB per all-reduce in each
direction beyond the formula, for 1 KB to 1 MB, as on the jax side, and about
0.2 KB per broadcast (0 -> 1; 0.15-0.35 KB of acknowledgements 1 -> 0).

d = 15,253,578 (vgg16) and 957,210 (vgg16_slim), as defjax's models. Payload
bytes per step and direction of the all-reduces, and the buffers that the
direction 0 -> 1 carries besides:

  model       ddp         powersgd@1  powersgd@4  fp16        buffers
  vgg16       61,014,312     215,740     698,488  30,507,156   33,896
  vgg16_slim   3,828,840      54,076     175,096   1,914,420    8,552

(powersgd@r: 13,706 / 3,434 values uncompressed, P + Q 40,229 r / 10,085 r;
the hook's own count, ``PowerSGDState.total_numel_after_compression`` after
its first compressed step, is checked against this before timing.)

Run by ``python -m bench.slow_link`` (both frameworks, the parent), or alone:
slow_link.run_on_link('bench.slow_link_torch', [worker args], devices=1).
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Sequence

from bench import procs
from bench import slow_link

VARIANTS = ('ddp', 'powersgd@1', 'powersgd@4', 'fp16')
# defjax's parameter counts (bench.common.Setup(name, 1, 1).num_params),
# written out because this worker must not import JAX.
JAX_NUM_PARAMS = {'vgg16': 15_253_578, 'vgg16_slim': 957_210}
# As defjax/models/vgg.py: channel counts, 'M' a 2x2 max-pool.
VGG16 = (
    64,
    64,
    'M',
    128,
    128,
    'M',
    256,
    256,
    256,
    'M',
    512,
    512,
    512,
    'M',
    512,
    512,
    512,
    'M',
)
VGG16_SLIM = tuple(c if c == 'M' else c // 4 for c in VGG16)
# model -> (cfg, width of the classifier's two hidden Linear layers)
MODELS = {'vgg16': (VGG16, 512), 'vgg16_slim': (VGG16_SLIM, 128)}
CLASSES = 10
LR, MOMENTUM, WD = 0.05, 0.9, 5e-4
# PowerSGD's dense all-reduce steps; 2 is the least the hook allows with
# error feedback or warm start (DDP rebuilds its buckets after step 1).
START_POWERSGD_ITER = 2
# Untimed steps before time_rounds: the dense ones, then the first compressed
# one (which allocates P and Q and draws Q at random; warm start reuses them
# afterwards). The other variants run as many, for DDP's bucket rebuild.
WARM_STEPS = START_POWERSGD_ITER + 1
FLOAT32_BYTES = 4
FLOAT16_BYTES = 2


def build_vgg(model: str):
  """The DEF authors' VGG with BN for 32x32 inputs, as defjax's ``model``.

  13 conv3x3 (with bias) + BN + ReLU with five max-pools, then Dropout,
  Linear(w, w), ReLU, Dropout, Linear(w, w), ReLU, Linear(w, 10). Initialised
  as ``defjax.models.layers`` (He-normal fan-out convs, zero biases).
  """
  from torch import nn

  cfg, width = MODELS[model]
  layers, channels = [], 3
  for item in cfg:
    if item == 'M':
      layers.append(nn.MaxPool2d(2, 2))
    else:
      conv = nn.Conv2d(channels, item, 3, padding=1, bias=True)
      nn.init.kaiming_normal_(conv.weight, mode='fan_out', nonlinearity='relu')
      nn.init.zeros_(conv.bias)
      layers += [conv, nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
      channels = item
  layers += [
      nn.Flatten(),
      nn.Dropout(0.5),
      nn.Linear(channels, width),
      nn.ReLU(inplace=True),
      nn.Dropout(0.5),
      nn.Linear(width, width),
      nn.ReLU(inplace=True),
      nn.Linear(width, CLASSES),
  ]
  for layer in layers:
    if isinstance(layer, nn.Linear):
      nn.init.zeros_(
          layer.bias
      )  # weights: PyTorch's default, as defjax's dense_init
  return nn.Sequential(*layers)


def powersgd_split(
    shapes: Sequence[Sequence[int]], rank: int, min_compression_rate: float
) -> tuple[int, int, int]:
  """(uncompressed, P, Q) values per rank for gradients of ``shapes``, by
  ``powerSGD_hook``'s own rule (its ``_should_compress``; see the docstring)."""
  uncompressed = ps = qs = 0
  for shape in shapes:
    n = shape[0]
    m = math.prod(shape[1:])  # 1 for a 1-D tensor, as tensor.view(n, -1)
    r = min(n, m, rank)
    if (n + m) * r * min_compression_rate < n * m:
      ps += n * r
      qs += m * r
    else:
      uncompressed += n * m
  return uncompressed, ps, qs


def plan(model, variant: str, min_compression_rate: float = 2) -> dict:
  """What one step of ``variant`` sends, from ``model``'s shapes alone.

  Returns {'allreduce_bytes': [n per rank of each all-reduce, in order],
  'broadcast_bytes': [bytes of each buffer broadcast, rank 0 -> 1],
  'payload_bytes': (direction 0 -> 1, direction 1 -> 0)}.
  """
  params = [p for p in model.parameters() if p.requires_grad]
  d = sum(p.numel() for p in params)
  method, _, rank = variant.partition('@')
  if method == 'ddp':
    allreduce = [FLOAT32_BYTES * d]
  elif method == 'fp16':
    allreduce = [FLOAT16_BYTES * d]
  elif method == 'powersgd':
    split = powersgd_split(
        [tuple(p.shape) for p in params], int(rank), min_compression_rate
    )
    allreduce = [FLOAT32_BYTES * k for k in split]
  else:
    raise ValueError(f'unknown variant {variant!r}; choose from {VARIANTS}')
  # _broadcast_coalesced buckets the buffers by dtype (each bucket up to
  # DDP's 250 MiB broadcast_bucket_size, far above these models' buffers).
  by_dtype: dict = {}
  for b in model.buffers():
    by_dtype[b.dtype] = by_dtype.get(b.dtype, 0) + b.numel() * b.element_size()
  broadcast = list(by_dtype.values())
  ring = sum(slow_link.ring_link_bytes(n, 2) for n in allreduce)
  return {
      'allreduce_bytes': allreduce,
      'broadcast_bytes': broadcast,
      'payload_bytes': (ring + sum(broadcast), ring),
  }


def torch_worker(a) -> None:
  """One host: builds the variants, warms them, times them with
  ``slow_link.time_rounds`` and writes ``{a.out}.{a.rank}`` (JSON)."""
  import torch
  import torch.distributed as dist
  import torch.nn.functional as F
  from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
  from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
  from torch.nn.parallel import DistributedDataParallel as DDP

  torch.set_num_threads(1)
  # Gloo binds the interface named here: the link, not loopback.
  os.environ['GLOO_SOCKET_IFNAME'] = a.dev
  dist.init_process_group(
      'gloo', init_method=f'tcp://{a.coordinator}', rank=a.rank, world_size=2
  )

  torch.manual_seed(
      0
  )  # the same model on both ranks (DDP broadcasts it anyway)
  base = build_vgg(a.model)
  d = sum(p.numel() for p in base.parameters())
  assert d == JAX_NUM_PARAMS[a.model], (a.model, d, JAX_NUM_PARAMS[a.model])
  # One bucket: the cap (MiB) above the gradient's size.
  bucket_cap_mb = FLOAT32_BYTES * d / 2**20 + 1

  gen = torch.Generator().manual_seed(a.rank)
  data = [
      (
          torch.randn(a.batch, 3, 32, 32, generator=gen),
          torch.randint(0, CLASSES, (a.batch,), generator=gen),
      )
      for _ in range(2)
  ]

  names = a.variants.split(',')
  runners, plans, states, ddps = {}, {}, {}, {}
  for name in names:
    method, _, rank = name.partition('@')
    model = copy.deepcopy(base)
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb)
    if method == 'powersgd':
      state = psgd.PowerSGDState(
          process_group=None,
          matrix_approximation_rank=int(rank),
          start_powerSGD_iter=START_POWERSGD_ITER,
          use_error_feedback=True,
          warm_start=True,
      )
      ddp.register_comm_hook(state, psgd.powerSGD_hook)
      states[name] = state
      plans[name] = plan(model, name, state.min_compression_rate)
    elif method in ('ddp', 'fp16'):
      if method == 'fp16':
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
      plans[name] = plan(model, name)
    else:
      raise ValueError(f'unknown variant {name!r}; choose from {VARIANTS}')
    opt = torch.optim.SGD(
        ddp.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD
    )
    ddps[name] = ddp
    runners[name] = _step_runner(ddp, opt, data, F.cross_entropy)

  for name in names:
    for _ in range(WARM_STEPS):
      runners[name]()
    # DDP's own record (a private API, the only one that says): one bucket
    # of the whole gradient after the rebuild.
    info = ddps[name]._get_ddp_logging_data()
    buckets = [
        int(s)
        for s in str(info['rebuilt_bucket_sizes']).split(',')
        if s.strip()
    ]
    if not info['has_rebuilt_buckets'] or buckets != [FLOAT32_BYTES * d]:
      raise RuntimeError(
          f'{name}: buckets {buckets}, expected one of {FLOAT32_BYTES * d} bytes'
      )
    if name in states:
      # The hook's own count of values before and after compression, over its
      # one compressed step so far, must be d and what ``plan`` says it sends.
      state = states[name]
      counted = (
          state.iter,
          state.total_numel_before_compression,
          state.total_numel_after_compression,
      )
      expected = (
          WARM_STEPS,
          d,
          sum(plans[name]['allreduce_bytes']) // FLOAT32_BYTES,
      )
      if counted != expected:
        raise RuntimeError(
            f'{name}: PowerSGD state (iter, values before, after) {counted},'
            f' expected {expected}'
        )

  log = (lambda s: print(s, flush=True)) if a.rank == 0 else (lambda s: None)
  res = slow_link.time_rounds(
      runners,
      rates=a.rates.split(','),
      rounds=a.rounds,
      steps=a.steps,
      dev=a.dev,
      barrier=lambda tag: dist.barrier(),
      log=log,
  )
  res.update(
      framework='torch',
      model=a.model,
      d=d,
      devices_per_host=1,
      workers=2,
      batch_per_worker=a.batch,
      allreduce_bytes={n: p['allreduce_bytes'] for n, p in plans.items()},
      allreduce_operands={
          n: len(p['allreduce_bytes']) for n, p in plans.items()
      },
      broadcast_bytes={n: p['broadcast_bytes'] for n, p in plans.items()},
      broadcast_operands={
          n: len(p['broadcast_bytes']) for n, p in plans.items()
      },
      formula_payload_bytes={
          n: p['payload_bytes'][0] for n, p in plans.items()
      },
      formula_payload_bytes_by_direction={
          n: list(p['payload_bytes']) for n, p in plans.items()
      },
      collectives_impl=dist.get_backend(),
      torch=torch.__version__,
  )
  with open(f'{a.out}.{a.rank}', 'w') as f:
    json.dump(res, f)
  dist.destroy_process_group()


def _step_runner(ddp, opt, data, loss_fn):
  """One blocking train step per call, alternating the two batches.

  Blocking: DDP's reducer waits for its bucket's communication (the hook's
  future included) at the end of ``backward``, before ``opt.step``.
  """
  t = [0]

  def run() -> None:
    x, y = data[t[0] % 2]
    t[0] += 1
    opt.zero_grad()
    loss_fn(ddp(x), y).backward()
    opt.step()

  return run


def main(argv=None):
  p = slow_link.worker_parser(__doc__)
  p.set_defaults(variants=','.join(VARIANTS))
  a = p.parse_args(argv)
  if a.rank is None:
    print(
        'bench.slow_link_torch is the PyTorch worker that bench.slow_link starts on the link;'
        ' run python -m bench.slow_link (root, Linux) for both frameworks.'
    )
    return None
  if a.devices != 1:
    raise SystemExit(
        'bench.slow_link_torch: one device (process) per host only'
    )
  a.rank = int(a.rank)
  a.batch = a.batch or slow_link.BATCH.get(a.model, 8)
  procs.pin_to_core(a.rank)
  torch_worker(a)
  return None


if __name__ == '__main__':
  main()
