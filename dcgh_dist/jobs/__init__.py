"""Every job's command line (parse, run the library, print): ``jobs/NAME.py`` runs
``dcgh_dist.jobs.NAME.main``. Importable, so tests and other programs call a job without its script."""
