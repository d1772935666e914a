"""The pictures in docs/: what the simulator makes (sample_grid: docs/simulated_samples.png,
docs/simulated_wide_samples.png) and the napari widget at work (napari_screenshot:
docs/napari.png)."""
