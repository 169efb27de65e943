"""Train DCGH (or DAPH) on a Ray cluster and evaluate it.

Usage, flags and outputs: ``python jobs/train.py --help``; the code: dcgh_dist/jobs/train.py.
"""

import os
import sys

if __name__ == "__main__":
    # The repository root, for `ray job submit --working-dir .` without an install.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from dcgh_dist.cli import run_job
    from dcgh_dist.jobs.train import main

    sys.exit(run_job(main))
