"""Data: reading microscope files (imagefile.py, io.py), lists and folders of image/mask pairs
(lists.py), one mask file per object (objectmasks.py), public annotated datasets built from
local clones (public.py), the simulator (simulate.py, simulate_random.py: the embedded
default dataset), datasets prepared and cached (dataset.py, loader.py), real and simulated
images mixed (mixing.py), preprocessing (preprocess.py) and the grain input pipelines
(pipeline.py). May import flmiseg.objects, configs and core.
"""
