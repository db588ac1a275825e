"""One-off investigations whose conclusions are in ``docs/methods/``; see ``bench/studies/README.md``."""
