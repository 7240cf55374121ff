"""`python -m radixlm` runs the command line."""

from radixlm.cli import main

if __name__ == "__main__":
    main()
