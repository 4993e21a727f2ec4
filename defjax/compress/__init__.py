"""Compressors shared by all workers: RBGS, Random-K, Top-K, scaling, identity.

A compressor ``C`` acts on a pytree of updates. Every compressor here is
described by three pure functions (optax style, bundled in a ``Compressor``):

* ``init(params) -> state``: the compressor's state (the shared block-selection
  key and a step counter for the random ones).
* ``compress(tree, state) -> C(tree)``: the local compressed tree, no
  communication. Used by tests and analysis.
* ``aggregate(tree, state, axis_name) -> (mean_k C(tree_k), tree - C(tree),
  new_state)``: the one collective of a step. ``axis_name=None`` is a single
  worker. For RBGS and Random-K only the selected values cross the wire, in
  one all-reduce for all leaves.

``payload(params)`` is the number of values each worker sends per step.

Modules: ``core`` (the bundle, checks, shared keys), ``rbgs`` (one global
block or one per leaf), ``per_shard`` (one block per local shard, for workers
sharded over a 'model' axis), ``comparison`` (Random-K, Top-K) and ``dense``
(scaling, identity, a dense warm-up).

References:
  Xu & Huang, "Detached Error Feedback for Distributed SGD with Random
  Sparsification", ICML 2022, Section 3 (RBGS) and Appendix (compressors).
"""

from defjax.compress.comparison import randomk
from defjax.compress.comparison import topk
from defjax.compress.core import AxisName
from defjax.compress.core import Compressor
from defjax.compress.core import KeyLike
from defjax.compress.core import PyTree
from defjax.compress.core import RandomState
from defjax.compress.core import SplitAxis
from defjax.compress.core import as_key
from defjax.compress.core import as_real_scalar
from defjax.compress.core import block_size
from defjax.compress.core import check_float_leaves
from defjax.compress.core import check_key
from defjax.compress.core import check_ratio
from defjax.compress.core import num_workers
from defjax.compress.core import split_mean
from defjax.compress.core import worker_axes
from defjax.compress.core import worker_mean
from defjax.compress.dense import WarmupState
from defjax.compress.dense import dense_warmup
from defjax.compress.dense import identity
from defjax.compress.dense import scaled
from defjax.compress.per_shard import per_shard_rbgs
from defjax.compress.rbgs import circular_block
from defjax.compress.rbgs import per_leaf_block_sizes
from defjax.compress.rbgs import place_block
from defjax.compress.rbgs import rbgs

__all__ = [
    'AxisName',
    'Compressor',
    'KeyLike',
    'PyTree',
    'RandomState',
    'SplitAxis',
    'WarmupState',
    'as_key',
    'as_real_scalar',
    'block_size',
    'check_float_leaves',
    'check_key',
    'check_ratio',
    'circular_block',
    'dense_warmup',
    'identity',
    'num_workers',
    'per_leaf_block_sizes',
    'per_shard_rbgs',
    'place_block',
    'randomk',
    'rbgs',
    'scaled',
    'split_mean',
    'topk',
    'worker_axes',
    'worker_mean',
]
