"""Ablate the DCGH loss: train named variants of one config and put them in one report.

Usage, flags and outputs: ``python jobs/ablate.py --help``; the code: dcgh_dist/jobs/ablate.py.
"""

import os
import sys

if __name__ == "__main__":
    # The repository root, for `ray job submit --working-dir .` without an install.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from dcgh_dist.cli import run_job
    from dcgh_dist.jobs.ablate import main

    sys.exit(run_job(main))
