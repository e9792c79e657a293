"""train: the nightly LoRA fine-tune on the user's conversations, behind a gate.

* :mod:`~milton.train.jobs`: the ``train-lora`` job (export, train, evaluate, gate, publish);
* :mod:`~milton.train.dataset`, :mod:`~milton.train.redact`, :mod:`~milton.train.formatting`:
  the data, with secrets removed, as token ids and labels;
* :mod:`~milton.train.lora`: LoRA training; :mod:`~milton.train.loop`: the one step loop (also
  evolve's); :mod:`~milton.train.checkpoints`: resumable checkpoints;
* :mod:`~milton.train.evaluate`, :mod:`~milton.train.gate`: measuring and deciding.

Imports :mod:`milton.core`, :mod:`milton.models` and :mod:`milton.memory`.
"""
