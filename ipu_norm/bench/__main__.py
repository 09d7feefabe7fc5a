"""Entry point of `python -m ipu_norm.bench`."""

from ipu_norm.bench.run import main

main()
