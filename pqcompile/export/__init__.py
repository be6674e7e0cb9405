"""The compressed model in other formats: ``onnx_export.py`` writes it as an ONNX QDQ graph
(:func:`pqcompile.export_onnx`), with the op emitters (``onnx_emitters.py``), the float islands
(``onnx_islands.py``) and the integer affine maps (``onnx_affine.py``) it is built from."""
