"""A trained model outside flmiseg: ONNX graphs, bioimage.io packages, ONNX Runtime.

  onnx_graph.py    conversion to ONNX (jax2onnx), checked against JAX, cached per checkpoint
  onnx_backend.py  --backend=onnx: ONNX Runtime in place of the JAX forward pass
  bioimage.py      --mode=export: the bioimage.io package (readme.py: its words)

May import flmiseg.evaluation, inference, store and below; never cli or main. jax2onnx, onnx,
onnxruntime and bioimageio.spec (the `flmiseg[export]` extra) are imported only when used.
"""
