"""Run the benchmarks: the same as ``mllm-ref bench [ID] [--json] [--quick]``."""

import sys

from mllm_ref.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
