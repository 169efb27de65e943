"""Encode a dataset into binary code shards with a trained checkpoint (Ray Data, streaming).

Usage, flags and outputs: ``python jobs/encode.py --help``; the code: dcgh_dist/jobs/encode.py.
"""

import os
import sys

if __name__ == "__main__":
    # The repository root, for `ray job submit --working-dir .` without an install.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from dcgh_dist.cli import run_job
    from dcgh_dist.jobs.encode import main

    sys.exit(run_job(main))
