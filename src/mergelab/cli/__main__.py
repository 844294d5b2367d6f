"""``python -m mergelab.cli``: the same as the ``mergelab`` command."""

from mergelab.cli import main

if __name__ == "__main__":
    main()
