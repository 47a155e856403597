"""`python -m services.cli ...` is the same as the `memserve` console script."""

from services.cli import main

main()
