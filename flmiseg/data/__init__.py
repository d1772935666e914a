"""Data: the simulator (embedded default dataset), reading lists and folders of images,
preprocessing, and the grain input pipelines."""
