"""Defaults shared by every config: each field is documented here.

Variants import this module and override a few fields.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Dataset: fashion_mnist | image_folder | cifar10 | cifar100 | imagenet2012.
  config.dataset = 'fashion_mnist'
  # Where the data is; '' = the dataset's default location (Debian's
  # /usr/share/datasets/fashion-mnist, TFDS's ~/tensorflow_datasets). For
  # image_folder, a folder or .tar of train/<class>/* and test/<class>/*.
  config.data_dir = ''
  # Model: cnn | mlp_tp | vgg16 | vgg16_slim | vgg16_linear | vgg16_slim_linear |
  # resnet20 | preact_resnet110 | wrn28_10 | resnet50 (defjax/training/models/__init__.py).
  config.model = 'cnn'
  # K, the number of workers. K > devices simulates K / devices per device.
  config.num_workers = 8
  # M, the devices of one worker (tensor parallelism, defjax.layouts.sharded):
  # K workers of M devices on a ('data', 'model') mesh, the params sharded
  # over 'model' by the model's nn.with_partitioning specs (mlp_tp has them),
  # one RBGS block per local shard. 1 = the 1-D layout
  # (defjax.layouts.data_parallel). M > 1 must divide the device count and
  # needs K * M <= devices.
  config.model_axis_size = 1
  # M, the data-parallel devices of one worker, a host (defjax.layouts.hosts):
  # K hosts of M devices on a ('data', 'replica') mesh; a worker's gradient is
  # the dense mean over its host's devices, its batch_size examples split over
  # them, and only the RBGS block crosses hosts, split M ways. 1 = the 1-D
  # layout. Needs K * M <= devices (a process of M devices is one host).
  config.devices_per_host = 1
  # Mini-batch per worker (the global batch is num_workers * batch_size).
  config.batch_size = 16
  config.num_epochs = 3
  # > 0 overrides num_epochs (the schedule then spans these steps; see
  # optim.decay_whole_epochs for runs shorter than a few epochs).
  config.num_train_steps = 0
  # Seed of the parameters, the data order, augmentation and (unless
  # optim.block_seed is set) the RBGS block sequence.
  config.seed = 0
  # Evaluate every this many steps; 0 = once per epoch (and always at the end).
  config.eval_every_steps = 0
  # Evaluation batch size (split over the devices).
  config.eval_batch_size = 1000
  # Steps run per compiled call (a lax.scan on the devices): one dispatch and
  # one host sync per this many steps; metrics, evaluation, checkpoints and
  # signals are handled between calls. 0 = the platform's measured default
  # (trainer.AUTO_STEPS_PER_DISPATCH: 1). Every value > 1 gives the same bits;
  # they differ from 1's in float rounding (another compiled program).
  config.steps_per_dispatch = 0
  # With more workers than devices (K > devices), how each device computes its
  # workers' gradients: 'vmap' (one batched program; DEF's per-worker eval
  # points make every convolution a grouped one), 'unroll' (a copy of the
  # model per local worker) or 'auto' (data_parallel.AUTO_LOCAL_GRADIENTS:
  # unroll on CPU, where bench/local_workers.py measured it far faster).
  config.local_gradients = 'auto'
  # Checkpoint every this many steps (0 = only at the end and on SIGTERM).
  config.checkpoint_every_steps = 0
  # Checkpoints kept in <workdir>/checkpoints.
  config.max_to_keep = 2
  # On resume with a different num_workers, map the saved error buffers onto
  # the new workers so that mean_k e_k (and DEF's output y) is preserved.
  config.resume_reshard = False
  # Average batch-norm statistics over workers after every step (the authors
  # do; evaluation then uses the synced statistics).
  config.sync_batch_stats = True
  # On-device augmentation: random crop with this zero padding (0 = none) and
  # random horizontal flips; images are then standardised per channel.
  config.crop_padding = 0
  config.flip = False
  # Side of the square crops a streamed dataset (imagenet2012) produces.
  config.image_size = 224

  config.optim = optim = ml_collections.ConfigDict()
  # sgd | ef | def | def_a | saef | psync (def and def_a are the same run; they
  # differ only in the model reported as test_accuracy: y or x) | ef21_sgdm |
  # ef21 (EF21-SGDM and plain EF21, defjax.ef21; not in the paper's tables).
  optim.method = 'def'
  # Compression ratio d / b of RBGS (ignored by sgd).
  optim.ratio = 256.0
  # DEF's detach coefficient lam in [0, 1] (ef uses 0, saef and psync 1).
  optim.lam = 0.3
  # One block per leaf (the authors' code) instead of one over all values.
  # One global block moves all batch-norm and bias leaves together about once
  # every `ratio` steps, which batch-normalised models train far worse with
  # (docs/results.md, Block layout). Older results ran with False (their
  # summary.json).
  optim.per_leaf = True
  # Seed of the shared RBGS block sequence (the same on every worker); unset
  # = config.seed. Set it to vary the initialisation and data over seeds with
  # the blocks fixed. A resumed run continues the block sequence it saved.
  optim.block_seed = ml_collections.config_dict.placeholder(int)
  optim.lr = 0.05
  # Heavy-ball momentum mu (ef21 runs with 0).
  optim.momentum = 0.9
  optim.weight_decay = 5e-4
  # step (divide by 10 at each decay_at fraction of training) | cosine.
  optim.schedule = 'step'
  optim.decay_at = (0.5, 0.75)
  # Decay at the start of epoch int(f * num_epochs), as the authors do (True),
  # or at step int(f * total_steps) (False: older results, their summary.json).
  # A short run keeps whole epochs only where a decay's epoch comes after
  # step 0 and after the previous decay's epoch; the other decays come at
  # step int(f * total_steps). (Without that, a run under 2 epochs, e.g.
  # num_train_steps=400 of the quick start, would train at lr / 100 from its
  # first step.) With decay_at (0.5, 0.75), every run of 8/3 epochs or more
  # decays at whole epochs only.
  optim.decay_whole_epochs = True
  # Linear learning-rate warm-up from 0, in epochs; it must end before the
  # first decay and before the run does (ConfigError otherwise).
  optim.warmup_epochs = 0.0
  # Dense (uncompressed) all-reduce for this many steps before compression.
  optim.dense_warmup_steps = 0
  return config
