"""Images in: loading and checking them, placeholder expansion, M-RoPE positions, the encoder
output cache.

The pieces run in different places, so each module is imported on its own (this package's
``__init__`` imports nothing): ``image.py`` and ``processor.py`` run where requests are checked
(``engine/input_processing.py``: the offline ``LLM``, the API process and the engine), and turn
images into plain data (``MultiModalFeature``: pixel values as a numpy array, the patch grid,
the placeholder span, a content hash) that travels with the new sequence in the step contract;
``mrope.py`` and ``encoder_cache.py`` run in the worker.
"""
