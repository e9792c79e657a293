"""anomaly: the rare-process detector.

* :mod:`~milton.anomaly.model`: features, the model artifact and scoring;
* :mod:`~milton.anomaly.train`: the hourly ``train-anomaly`` job;
* :mod:`~milton.anomaly.detect`: ``detect`` and ``score_rows``;
* :mod:`~milton.anomaly.simulate`: a simulated workstation (tests, benchmarks).

Imports :mod:`milton.core`, :mod:`milton.models` and :mod:`milton.ingest`.
"""
