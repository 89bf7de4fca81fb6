"""The benchmark suite behind `scripts/bench`: every figure is a ratio against a baseline
measured in the same run on the same database, because this machine is shared and absolute
times drift."""
