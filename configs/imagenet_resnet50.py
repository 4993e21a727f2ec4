r"""The paper's ImageNet setting: ResNet-50 (TFDS imagenet2012).

Batch 256 in all (K = 8 workers of 32), 100 epochs, lr / 10 at epochs 30, 60
and 90, momentum 0.9, weight decay 1e-4, random-resized crop + flip +
standardisation. The paper tunes the base lr in {0.1, 0.05, 0.01}; 0.1 is
the usual value for batch 256. Needs prepared TFDS data (pip install
'defjax[tfds]', the ImageNet archives in TFDS's manual download folder, then
tfds build imagenet2012 --file_format=array_record; see
docs/guides/training-program.md).

  python train.py --config configs/imagenet_resnet50.py --workdir runs/in-def256
"""

from configs import default


def get_config():
  config = default.get_config()
  # Batch 256 in all: the default K = 8 workers, of 32 images each.
  config.update(dataset='imagenet2012', model='resnet50', batch_size=32)
  config.update(
      num_epochs=100, eval_batch_size=500, checkpoint_every_steps=5000
  )
  config.optim.update(lr=0.1, weight_decay=1e-4, decay_at=(0.3, 0.6, 0.9))
  return config
