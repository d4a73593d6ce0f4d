"""``python -m share_convert.cli``: the same as the ``share-convert`` console script."""

from . import main

main()
