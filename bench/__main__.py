"""`python -m bench`: run the benchmark parts (see bench.main)."""

from bench.main import main

if __name__ == "__main__":
    main()
