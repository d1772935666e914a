"""Speed and reliability of the product: train and predict step throughput, beside PyTorch
(benchmark, torch_unet, conv_profile; docs/benchmarks.md), the input pipeline
(pipeline_benchmark), scaling over devices and the multi-process check (scaling;
docs/scaling.md), kill -9 during training (fault_injection; docs/reliability.md), what a
bioimage.io package loses (export_loss; docs/export.md), and a gigapixel OME-Zarr predicted
block by block (gigapixel; docs/large_images.md)."""
