"""anomaly: the rare-process detector.

* :mod:`~milton.anomaly.model`: features, the model artifact and scoring;
* :mod:`~milton.anomaly.train`: the hourly ``train-anomaly`` job;
* :mod:`~milton.anomaly.detect`: ``detect`` and ``score_rows``;
* :mod:`~milton.anomaly.alerts`: alerts (one per process and day), ack, mute, rate-limited
  notifications;
* :mod:`~milton.anomaly.simulate`: a simulated fleet (workstation, servers; tests, benchmarks).

Imports :mod:`milton.core`, :mod:`milton.models` and :mod:`milton.ingest`.
"""
