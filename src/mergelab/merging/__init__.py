"""Weight-space merging: the method contract (``spec``, ``base``), the methods, the tensor maths (``ops``) and the
streaming engine (``engine``, ``api.merge_streaming``). The registry and ``mergelab.merge`` live in ``mergelab.api``."""
