"""One module per merging method (each class carries its ``spec``); ``mergelab.api.registry`` lists them."""
