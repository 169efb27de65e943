"""A report over finished training runs: report.md and a self-contained report.html.

Usage, flags and outputs: ``python jobs/report.py --help``; the code: dcgh_dist/jobs/report.py.
"""

import os
import sys

if __name__ == "__main__":
    # The repository root, for `ray job submit --working-dir .` without an install.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from dcgh_dist.cli import run_job
    from dcgh_dist.jobs.report import main

    sys.exit(run_job(main))
