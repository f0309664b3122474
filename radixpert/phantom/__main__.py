"""``python -m radixpert.phantom``: the same as ``radixpert-phantom``."""

from radixpert.phantom.cli import main

main()
