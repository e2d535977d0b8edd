"""`python -m lmaczs_cli ...` (and `torchrun -m lmaczs_cli ...`) run the `lmaczs` CLI."""
from lmaczs_cli.cli import main

if __name__ == "__main__":
    main(prog_name="lmaczs")
