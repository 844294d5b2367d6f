"""The bottom layer: errors, paths (the cache folder), seeds and samplers, progress, config parsing helpers."""
