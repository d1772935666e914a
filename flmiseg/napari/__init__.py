"""flmiseg in napari: a widget that segments an image layer, and simulated sample images.

The npe2 manifest (napari.yaml, found through the `napari.manifest` entry point that
pyproject.toml declares) contributes the widget (Plugins > flmiseg > Segment: _widget.py) and
sample data (File > Open Sample > flmiseg: _sample.py). Needs the napari extra
(`pip install "flmiseg[napari]"`); nothing outside this package imports napari or Qt, and
importing this package imports neither. docs/napari.md shows the widget. May import
flmiseg.inference, store, data, objects and core.
"""
