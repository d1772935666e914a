"""Training: the loop (trainer.py), the pure jitted steps (steps.py), losses (losses.py), the
optimiser and schedule (optim.py), fine-tuning from a trained model (finetune.py) and every
config field's rule (config_checks.py). May import evaluation and everything below it; never
export or cli.
"""
