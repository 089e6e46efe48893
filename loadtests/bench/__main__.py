import sys

from loadtests.bench.cli import main

sys.exit(main(prog="python -m loadtests.bench"))
