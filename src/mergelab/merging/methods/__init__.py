"""One module per merging method; the registry in ``mergelab.merge.registry`` lists them."""
