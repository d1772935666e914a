"""The reference recipe for U-Net on NUCLEUS (meant for a GPU).

  python -m flmiseg.main --config=configs/unet_nucleus.py --workdir=runs/unet_nucleus

The same recipe as configs/unet_er.py (width 64, 256x256, batch 16, 30 epochs, SGD lr 0.01
momentum 0.9 weight decay 5e-4, x0.1 every 5 epochs, soft IoU); only the dataset kind (and
so the simulated structures and the preprocessing) differs. Point it at real data with
--config.data.source=lists --config.data.train_list=... --config.data.test_list=...
"""

from flmiseg.configs import unet_er


def get_config():
  config = unet_er.get_config()
  config.data.kind = 'nucleus'
  return config
