"""``mathrl export``: a run or checkpoint as a model other tools load (:mod:`mathrl.export.command`);
its options live in :mod:`mathrl.export.config`, which ``--help`` reads without importing torch."""
