"""Weight-space merging: method registry, streaming engine, and the public ``merge`` API."""
