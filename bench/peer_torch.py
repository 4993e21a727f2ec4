"""A PyTorch reference of SGD / EF / DEF with RBGS on CPU (gloo, 2 processes).

Written from the paper (Algorithm 1) for this benchmark only; PyTorch is not
a defjax dependency. Needs ``pip install torch`` in the environment; without
it the script says so and writes nothing.

Both processes hold the same ~15M-parameter MLP as ``bench/collectives.py``
(32x32x3 -> 3072 -> 1792 -> 10), with every parameter and gradient a view of
one flat buffer (the layout the authors' code builds with a flattened
gradient), one thread and one core each. Per step it times

* ``grad``: forward + backward at the gradient point z (x for SGD and EF,
  x - lam e for DEF);
* ``opt``: optimizer + communication: momentum with weight decay, p = lr m + e,
  the all-reduce of the circular RBGS block (the full gradient for SGD), the
  model and error update, and writing the next gradient point into the model.

``allreduce_only`` is a bare all-reduce of the d-float gradient buffer.
``opt`` is the part defjax replaces; it is compared with the optimizer-only
timing of ``bench/collectives.py`` (same model, K = 2, gloo) when that
benchmark's JSON is present.

Run: python -m bench.peer_torch [--ratios 16,64,256,1024]
"""

from __future__ import annotations

import json
import os
import resource
import time

from bench import procs

RATIOS = (16, 64, 256, 1024)
BATCH = 8
ROUNDS = 6
STEPS = 3
LR, MOMENTUM, WD, LAM = 0.05, 0.9, 5e-4, 0.3


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()
  except ImportError:
    return False


def worker(rank: int, port: int, ratios, out_path: str) -> None:
  import torch
  import torch.distributed as dist
  from torch import nn

  torch.set_num_threads(1)
  os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
  dist.init_process_group('gloo', rank=rank, world_size=2)
  world = dist.get_world_size()
  torch.manual_seed(0)
  model = nn.Sequential(
      nn.Flatten(),
      nn.Linear(3072, 3072),
      nn.ReLU(),
      nn.Linear(3072, 1792),
      nn.ReLU(),
      nn.Linear(1792, 10),
  )
  params = list(model.parameters())
  d = sum(p.numel() for p in params)
  # Parameters and gradients as views of two flat buffers.
  flat = torch.cat([p.detach().reshape(-1) for p in params])
  flat_grad = torch.zeros(d)
  off = 0
  for p in params:
    n = p.numel()
    p.data = flat[off : off + n].view_as(p)
    p.grad = flat_grad[off : off + n].view_as(p)
    off += n
  x0 = flat.clone()  # the shared model x
  gen = torch.Generator().manual_seed(rank)
  data = [
      (
          torch.randn(BATCH, 3, 32, 32, generator=gen),
          torch.randint(0, 10, (BATCH,), generator=gen),
      )
      for _ in range(2)
  ]
  loss_fn = nn.CrossEntropyLoss()

  def make(method: str, ratio: int):
    lam = {'sgd': 0.0, 'ef': 0.0, 'def': LAM}[method]
    x = x0.clone()  # this variant's model; the model's buffer ``flat`` holds z
    m = torch.zeros(d)
    e = torch.zeros(d)
    b = max(1, -(-d // ratio))
    block_gen = torch.Generator().manual_seed(1234)  # shared by both workers
    arange = torch.arange(b)
    state = {'t': 0}
    # With lam = 0 the gradient point is x itself: update the model in place.
    model_x = x if lam else flat

    def activate():  # untimed: load this variant's gradient point
      flat.copy_(x - lam * e)

    def deactivate():
      if not lam:
        x.copy_(flat)

    def grad_step():
      flat_grad.zero_()
      xb, yb = data[state['t'] % 2]
      loss_fn(model(xb), yb).backward()

    def opt_step():
      g = flat_grad
      if method == 'sgd':
        dist.all_reduce(g)
        g.div_(world)
        m.mul_(MOMENTUM).add_(g).add_(flat, alpha=WD)
        flat.add_(m, alpha=-LR)
      else:
        m.mul_(MOMENTUM).add_(g).add_(flat, alpha=WD)  # weight decay at z
        p = e.add_(m, alpha=LR)  # p = lr m + e, in e's buffer
        start = int(torch.randint(0, d, (1,), generator=block_gen))
        idx = (arange + start) % d  # circular block
        vals = p[idx]
        dist.all_reduce(vals)
        vals.div_(world)
        model_x.index_add_(0, idx, vals, alpha=-1.0)
        p.index_fill_(0, idx, 0.0)  # e = p - C(p)
        if lam:
          torch.sub(x, e, alpha=lam, out=flat)  # the next gradient point
      state['t'] += 1

    return activate, grad_step, opt_step, deactivate

  variants = {'sgd': make('sgd', 1)}
  for r in ratios:
    variants[f'ef@{r}'] = make('ef', r)
    variants[f'def@{r}'] = make('def', r)
  times = {n: {'grad': [], 'opt': [], 'opt_minflt': []} for n in variants}
  times['allreduce_only'] = {'grad': [], 'opt': [], 'opt_minflt': []}

  def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

  for rnd in range(ROUNDS + 1):  # round 0 warms up
    for name, (activate, grad_step, opt_step, deactivate) in variants.items():
      activate()
      dist.barrier()
      tg = to = 0.0
      fo = 0
      for _ in range(STEPS):
        t0 = time.perf_counter()
        grad_step()
        t1 = time.perf_counter()
        f0 = faults()
        opt_step()
        fo += faults() - f0
        t2 = time.perf_counter()
        tg += t1 - t0
        to += t2 - t1
      deactivate()
      if rnd:
        times[name]['grad'].append(tg / STEPS)
        times[name]['opt'].append(to / STEPS)
        times[name]['opt_minflt'].append(fo / STEPS)
    dist.barrier()
    f0 = faults()
    t0 = time.perf_counter()
    for _ in range(STEPS):
      dist.all_reduce(flat_grad)
    if rnd:
      times['allreduce_only']['grad'].append(0.0)
      times['allreduce_only']['opt'].append((time.perf_counter() - t0) / STEPS)
      times['allreduce_only']['opt_minflt'].append((faults() - f0) / STEPS)
  if rank == 0:
    with open(out_path, 'w') as f:
      json.dump(
          {
              'd': d,
              'batch_per_worker': BATCH,
              'rounds': ROUNDS,
              'steps_per_sample': STEPS,
              'torch': torch.__version__,
              'times': times,
          },
          f,
      )
  dist.destroy_process_group()


def launch(ratios, timeout_s: float = 540, env=None) -> dict:
  """Process 0's timings; ``env``: more environment for the two workers."""
  return procs.run_pair(
      'bench.peer_torch',
      ['--ratios', ','.join(map(str, ratios))],
      {'OMP_NUM_THREADS': '1', **(env or {})},
      timeout_s,
  )


def rows_of(result: dict, jax_opt: dict | None) -> list[dict]:
  from bench import common

  t = result['times']
  rows = []
  for name, s in t.items():
    opt = common.summarize(s['opt'])
    ratio = common.summarize([a / b for a, b in zip(s['opt'], t['sgd']['opt'])])
    row = {
        'variant': name,
        'torch_grad_ms': 1e3 * common.summarize(s['grad'])['median'],
        'torch_opt_ms': 1e3 * opt['median'],
        'torch_opt_vs_sgd': ratio['median'],
    }
    if jax_opt and name in jax_opt:
      row['defjax_opt_ms'] = 1e3 * jax_opt[name]['median']
      row['defjax_vs_torch'] = jax_opt[name]['median'] / opt['median']
    rows.append(row)
  return rows


COLUMNS = (
    'variant',
    'torch_grad_ms',
    'torch_opt_ms',
    'torch_opt_vs_sgd',
    'defjax_opt_ms',
    'defjax_vs_torch',
)


def main(argv=None):
  a = procs.parser(__doc__, RATIOS).parse_args(argv)
  ratios = a.ratios
  if a.rank is not None:
    procs.pin_to_core(a.rank)
    worker(a.rank, a.port, ratios, a.out)
    return None
  if not torch_available():
    print(
        'peer_torch: PyTorch with gloo is not installed; skipped'
        ' (pip install torch into the venv to run it).'
    )
    return None
  from bench import common

  result = launch(ratios)
  jax_opt, source = None, 'bench/results/collectives.json not found'
  cpath = common.RESULTS / 'collectives.json'
  if cpath.exists():
    doc = json.loads(cpath.read_text())
    mlp = [
        r for r in doc['results'] if r['model'] == 'mlp' and 'opt_step_s' in r
    ]
    if mlp:
      jax_opt, source = (
          mlp[0]['opt_step_s'],
          f'collectives.json ({doc["date"]})',
      )
  rows = rows_of(result, jax_opt)
  notes = (
      f'PyTorch {result["torch"]} on CPU, 2 processes x 1 thread pinned to a core, gloo;'
      f' MLP d = {result["d"]:,}, batch {result["batch_per_worker"]}/worker,'
      f' {result["rounds"]} rounds x {result["steps_per_sample"]} steps. opt = optimizer +'
      " communication per step (grad excluded); torch_opt_vs_sgd = per-round ratio to SGD's opt"
      f' time (median). defjax_opt_ms: the same part in defjax, from {source}.'
  )
  common.write(
      'peer_torch',
      {'result': result, 'rows': rows, 'defjax_opt_source': source},
      common.table(rows, COLUMNS),
      notes,
  )
  return rows


if __name__ == '__main__':
  main()
