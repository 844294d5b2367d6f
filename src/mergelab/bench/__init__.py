"""The offline benchmark: experiment config, grid runner, results store, report."""
