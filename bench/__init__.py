"""The project's benchmarks: `make bench` (`python -m bench [--only PART ...]`) and one
module per part, each also runnable alone (`python -m bench.sweep`, ...). They live
outside the installed packages: a node never ships them. Figures go in BENCHMARKS.md."""
