"""The Ray Serve query endpoint: ``serve run serve/config.yaml``; see docs/SERVE.md."""
