"""Build sharded FAISS binary indexes from code shards (Parquet ``id`` + ``code``), as Ray tasks.

Usage, flags and outputs: ``python jobs/build_index.py --help``; the code: dcgh_dist/jobs/build_index.py.
"""

import os
import sys

if __name__ == "__main__":
    # The repository root, for `ray job submit --working-dir .` without an install.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from dcgh_dist.cli import run_job
    from dcgh_dist.jobs.build_index import main

    sys.exit(run_job(main))
