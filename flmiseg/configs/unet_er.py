"""The reference recipe for U-Net on ER (meant for a GPU).

  python -m flmiseg.main --config=configs/unet_er.py --workdir=runs/unet_er

Width 64 (31,042,369 parameters), 256x256 images, batch 16, 30 epochs, SGD (lr 0.01,
momentum 0.9, weight decay 5e-4), learning rate x0.1 every 5 epochs, soft IoU loss; the
reference's data protocol for ER. Point it at real data with
--config.data.source=lists --config.data.train_list=... --config.data.test_list=...
"""

from flmiseg.configs import default


def get_config():
  config = default.get_config()
  config.data.kind = 'er'
  config.data.crop_size = 256
  config.data.num_synthetic_train = 1000
  config.data.num_synthetic_test = 40
  config.model.width = 64
  config.train.num_epochs = 30
  config.train.batch_size = 16
  config.train.loss = 'soft_iou'
  config.optim.name = 'sgd'
  config.optim.lr = 0.01
  config.optim.momentum = 0.9
  config.optim.weight_decay = 5e-4
  config.optim.schedule = 'step'
  config.optim.decay_epochs = 5.0
  config.optim.decay_rate = 0.1
  config.optim.warmup_steps = 0
  config.eval.every_steps = 500
  config.eval.batch_size = 16
  return config
