"""Fine-tune a shipped model (or any trained run) on a few annotated images of your own.

  python -m flmiseg.main --config=finetune --workdir=runs/my_nuclei \
      --config.train.init_from=nucleus \
      --config.data.train_list=/data/crops/train.txt --config.data.test_list=/data/test.txt

`init_from` names a shipped model (er, mito, nucleus) or a run/packed folder; the new run
keeps its architecture and preprocessing (its data.kind and normalisation are adopted with a
one-line warning when yours differ). Small-data recipe: a quarter of the images held out for
validation (at least one), augmentation on, a low constant learning rate, validation every 20
steps, the best checkpoint kept, and early stopping after 5 validations without a better
validation IoU. Masks may leave pixels unlabelled with --config.data.ignore_value=2.
"""

from flmiseg.configs import default


def get_config():
  config = default.get_config()
  config.data.source = 'lists'
  config.data.kind = 'nucleus'
  config.data.val_fraction = 0.25
  config.data.augment = 'all'
  config.train.init_from = 'nucleus'  # er | mito | nucleus, or a run/packed folder.
  config.train.num_steps = 400
  config.train.early_stop_patience = 5
  config.optim.lr = 5e-4
  config.optim.schedule = 'constant'
  config.optim.warmup_steps = 0
  config.eval.every_steps = 20
  return config
