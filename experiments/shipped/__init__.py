"""The shipped er, mito and nucleus models (docs/models.md): their recipe, training and
packing (train_pretrained; the recipe itself is experiments/common.py), how the recipe was
chosen (pretrained_recipe, domain_ablation, instances), and how the models fare where their
training data did not reach: real images (real_image), fine-tuning on a few crops (finetune),
other object scales (pretrained_scale), cell edges, camera defects, bit depths and images
smaller than a tile (docs/inference.md)."""
