"""One module per merging method; the registry in ``mergelab.merging.registry`` lists them."""
