"""Default: a small U-Net on simulated ER, trained on a 2-core CPU in about 2 minutes.

  python -m flmiseg.main --config=configs/default.py --workdir=runs/default

On first use it simulates an ER dataset (200 training, 20 test images of 256x256, 16-bit) into
a cache folder and reuses it afterwards. It trains a width-16 U-Net on 128x128 crops with
Adam and BCE+Dice, evaluates on a held-out validation split every `eval.every_steps`, keeps
the best checkpoint by validation IoU, and evaluates it on the test images. Measured on a
2-core CPU: 1 min 44 s from scratch, test IoU 0.88 (F1 0.94), a usable segmentation; Otsu's
threshold on the same images reaches IoU 0.58-0.63. Every field can be overridden, e.g.
--config.model.width=32. Each field has a rule (its check, and who may change it: eval/predict,
a resumed run) in flmiseg/train/config_checks.py RULES; a section left empty here (as
model.fusion_kwargs) takes fields the user names (--config.model.fusion_kwargs.<field>=...).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Seeds initialisation, shuffling, augmentation and the validation split (not the simulated
  # data: data.seed), so runs that differ only here train other models on the same data.
  config.seed = 0
  # Code of your own imported before anything is built: comma-separated module names or .py
  # files that register models, fusion operators, backbones or losses (docs/fusion.md).
  # A run directory never imports it on its own (eval/predict: --trust_imports).
  config.imports = ''
  # Who made the model and under which licence (an SPDX identifier): written into the
  # bioimage.io package that --mode=export makes ('' authors: flmiseg's).
  config.authors = ''
  config.license = 'MIT'

  config.data = data = ml_collections.ConfigDict()
  # 'synthetic' (simulated, embedded default), 'lists' (list files or images/ + masks/
  # folders) or 'object_masks' (<id>/images/<id>.png + <id>/masks/*.png, one mask file per
  # object, as the 2018 Data Science Bowl's: flmiseg/data/objectmasks.py).
  data.source = 'synthetic'
  # Seeds the simulated dataset (source='synthetic'; its cache folder ends in _seed<value>).
  # Run directories made before this field existed simulated with config.seed, and keep it.
  data.seed = 0
  data.kind = 'er'  # 'er', 'mito' or 'nucleus': what to simulate, and preprocessing.
  # source='lists': list file (image mask per line) or images/+masks/ dir; 'object_masks': a
  # folder of <id>/ folders.
  data.train_list = ''
  data.test_list = ''  # The test set, in the same format; never used for model selection.
  # A fixed validation set in the train list's format (e.g. the val/ split that
  # `python -m flmiseg.data.public` writes); '' = carve data.val_fraction out of train_list.
  data.val_list = ''
  data.synthetic_dir = ''  # Where simulated data is cached; '' = ~/.cache/flmiseg/synthetic.
  data.num_synthetic_train = 200  # Simulated training images (before the validation split).
  data.num_synthetic_test = 20  # Simulated test images.
  data.synthetic_size = 256  # Side of the simulated images, pixels.
  # 'default' | 'wide' | 'shifted': the simulator's knobs per image. 'default': each kind's
  # fixed microscope; 'wide': drawn per image over many microscopes (domain randomisation, to
  # train for real images); 'shifted': a held-out other microscope (flmiseg/data/
  # simulate_random.py). Not 'default' adds _<value> to the cached dataset's folder name.
  data.synthetic_params = 'default'
  # 'geometry' | 'visible': how the simulated masks are drawn (flmiseg/data/simulate.py MASKS):
  # the structure itself, or out to the half maximum of its blur, as a person annotates what
  # they see. 'visible' adds _visible to the cached dataset's folder name.
  data.synthetic_masks = 'geometry'
  # Mixed training (source lists or object_masks): the probability that a training draw is a
  # simulated image (the synthetic_* fields say which; synthetic_params='wide' for real
  # microscopes), seeded by config.seed and resumed with the run; validation and test stay
  # real. 0: real images only. (flmiseg/data/mixing.py)
  data.synthetic_fraction = 0.0
  data.crop_size = 128  # Training crop side; larger images are cropped, smaller padded.
  data.val_fraction = 0.1  # Fraction of train_list held out for model selection (no val_list).
  # auto|clahe_zscore|clahe_unit|percentile|zscore (bit-depth invariant), or the reference's
  # exact reference_clahe_zscore|reference_clahe_unit (flmiseg/data/preprocess.py).
  data.normalization = 'auto'
  # Micrometres per pixel of the training images (0: unknown). Predict resizes images of
  # another known pixel size (more than 10% off) to it.
  data.pixel_size = 0.0
  # Typical object diameter in the training images, pixels (0: not recorded). Predict's
  # --diameter (the objects' diameter in the user's images) resizes images so theirs match.
  data.object_diameter = 0.0
  data.flips = True  # Augment with the 8 flips/rotations of the square.
  # Robustness augmentation of training crops (simulated -> real microscopes): '' (off) or a
  # comma list of intensity,noise,blur,scale,illumination, or 'all' (those five); 'invert'
  # (named on its own, e.g. 'all,invert') also shows objects dark on bright, as brightfield.
  # Strengths: the constants in flmiseg/data/pipeline.py. Validation and test images are
  # never augmented.
  data.augment = ''
  # The 'scale' group's zoom factors (low, high), drawn log-uniformly: 0.5-2 teaches a model
  # objects from half to twice the sizes of its training images (magnifications it never saw).
  data.scale_range = (0.7, 1.4)
  # The 'dim' group's factors (low, high) on an object's signal above the background, drawn
  # log-uniformly: (0.07, 0.7) shows nuclei up to 14x dimmer than their neighbours.
  data.dim_range = (0.07, 0.7)
  # A mask value (e.g. 2) whose pixels are excluded from the loss and the metrics (sparse
  # labels: unlabelled pixels); -1: none, every nonzero mask pixel is foreground.
  data.ignore_value = -1
  # The channel (0-based) that training, validation and test images are read from when they
  # have several (multi-channel TIFFs; RGB images: 0 red, 1 green, 2 blue); -1: images must
  # have one channel (RGB ones become one, flmiseg/data/imagefile.py). Masks have one.
  data.channel = -1
  data.num_workers = 0  # grain worker processes for the training pipeline (0: in-process).

  config.model = model = ml_collections.ConfigDict()
  model.name = 'unet'  # See flmiseg/models/__init__.py: MODELS.
  model.variant = 'original'  # 'original' or 'lowlevel' (where the model has both).
  model.width = 16  # Base width (channels of the first stage); the reference's unet: 64.
  model.fusion = ''  # Fusion operator for models that take one; '' = the variant's default.
  # The fusion operator's fields (its hyper-parameters), e.g.
  # --config.model.fusion_kwargs.reduction=8 for se_concat; empty: its defaults.
  model.fusion_kwargs = ml_collections.ConfigDict()
  # Encoder for models that take one (lowlevel, deeplabv3p): resnet50|resnet101|vgg16 or one
  # of config.imports ('' = the model's default, resnet50). flmiseg/models/backbones.py.
  model.backbone = ''
  # The encoder's settings, e.g. --config.model.backbone_kwargs.output_stride=8 for resnet50;
  # empty: its defaults.
  model.backbone_kwargs = ml_collections.ConfigDict()
  model.num_classes = 1  # Output channels: one foreground logit.
  # '' or 'distance': an extra output that separates touching objects (flmiseg/objects/instances.py);
  # needs label-image masks (0 background, 1..N objects) to learn from.
  model.instance_head = ''

  config.train = train = ml_collections.ConfigDict()
  train.num_epochs = 12  # Passes over the training split (used when num_steps is 0).
  train.num_steps = 0  # When > 0, the number of training steps (replaces num_epochs).
  train.batch_size = 8  # Global batch, split over all devices (must divide evenly).
  train.loss = 'bce+dice'  # A loss or a sum: bce|wbce|focal|soft_iou|dice|l1|mse joined by +.
  train.loss_weights = ()  # One weight per loss term; () = all 1.
  train.dtype = 'float32'  # Computation dtype: float32 or bfloat16 (params stay float32).
  train.log_every_steps = 10  # Steps between progress/metrics.jsonl lines.
  train.checkpoint_every_steps = 0  # Steps between checkpoints; 0 = at every evaluation.
  train.max_checkpoints = 2  # How many of the latest checkpoints to keep.
  train.resume_mismatch = 'refuse'  # 'refuse' or 'allow' a workdir made by another config.
  # Fine-tuning: start from the weights of a shipped model (er, mito, nucleus) or of a run or
  # packed folder with the same config.model ('' = from scratch).
  train.init_from = ''
  # Validations without a better score (the IoU; with an instance head and label images the
  # mean of IoU and AP@0.5) before stopping (0: off).
  train.early_stop_patience = 0
  # Train with the BatchNorm statistics frozen (the layers in inference mode, dropout off):
  # fine-tuning on a few crops keeps the source model's statistics.
  train.freeze_batch_stats = False
  train.instance_weight = 1.0  # Weight of the instance head's loss (model.instance_head).

  config.optim = optim = ml_collections.ConfigDict()
  optim.name = 'adam'  # sgd|adam|adamw.
  optim.lr = 2e-3  # Peak learning rate.
  optim.momentum = 0.9  # SGD momentum.
  optim.weight_decay = 0.0  # L2 (sgd, adam) or decoupled (adamw) weight decay.
  optim.schedule = 'cosine'  # step|cosine|poly|constant.
  optim.decay_epochs = 5.0  # step: epochs between decays.
  optim.decay_rate = 0.1  # step: factor per decay.
  optim.end_lr_factor = 0.0  # cosine/poly: final lr as a fraction of lr.
  optim.power = 0.9  # poly: exponent.
  optim.warmup_steps = 10  # Linear warmup steps from 0 to lr.
  optim.grad_clip = 0.0  # Clip the global gradient norm to this (0: off).

  config.eval = ev = ml_collections.ConfigDict()
  ev.every_steps = 50  # Steps between validation passes (and checkpoints).
  ev.batch_size = 8  # Global eval batch (padded with masked entries at the end).
  ev.threshold = 0.5  # Probability threshold, as the reference.
  ev.calibrate_metric = 'iou'  # Threshold tuned on the validation split by this ('' = off).
  # Instance head: the h of the h-maxima of the predicted distance that seed objects
  # (flmiseg/objects/instances.py); calibrated on the validation split when it has label images.
  ev.seed_dynamic = 0.1
  ev.min_size = 16  # Instances: objects smaller than this many pixels are dropped.
  # Predict measures the objects of each image on a first pass and resizes it so they match
  # config.data.object_diameter, unless --diameter, --pixel_size or --no_rescale say otherwise
  # (Cellpose's default; needs an object_diameter). The shipped nucleus model does.
  ev.measure_diameter = False
  # Predict's dim pass (--dim_gain; flmiseg/inference/segment.py): a second pass with the
  # image's bright parts clipped at 1/dim_gain of its range adds the objects too dim for the
  # first (0: off; needs an object_diameter). Off in the shipped models (docs/models.md).
  ev.dim_gain = 0.0
  return config
