"""One module per evaluation protocol; each is a function of cached features (+ heads) and a seed."""
