"""flmiseg: segmentation of intracellular structures in fluorescence microscopy images.

A JAX/Flax reimplementation of "Segmentation of Intracellular Structures in Fluorescence
Microscopy Images by Fusing Low-Level Features" (Guo et al., PRCV 2021).
"""

__version__ = "0.1.0"
