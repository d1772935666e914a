"""Experiments: scripts that use flmiseg to measure it, grouped by what they are for.

  paper/       the paper's comparisons on the reference recipe: every model original vs
               lowlevel (paper_table), a smoke run of the zoo, the decoder-input ablation
               (feature_importance), a classical Otsu baseline.
  shipped/     the shipped er, mito and nucleus models: their recipe, training and packing
               (train_pretrained), how it was chosen (pretrained_recipe, domain_ablation,
               instances) and how they fare on images unlike their training data: real
               images, fine-tuning, object scale, cell edges, camera defects, bit depth,
               small images.
  benchmarks/  speed and reliability of the product: train/predict step throughput (beside
               PyTorch), the input pipeline, convolution profiles, scaling over devices,
               kill -9 fault injection, what a bioimage.io export loses.
  figures/     the pictures in docs/: simulated samples, the napari widget.
  common.py    the code several scripts share (the shipped recipe, scoring through the
               predict path, fake-device XLA flags): the only module scripts import from here.

Run one as `python3 -m experiments.<group>.<name> --help`. Experiments import the package;
the package and the tests' shared helpers (tests/helpers.py, tests/conftest.py) never import
experiments.
"""
