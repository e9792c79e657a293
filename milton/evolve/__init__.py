"""evolve: the monthly merge, trim, distil, prune and quantize pipeline towards a smaller, faster base.

* :mod:`~milton.evolve.jobs`: the ``evolve`` job; :mod:`~milton.evolve.runs`: its run
  directory, stages and report files;
* :mod:`~milton.evolve.merge`, :mod:`~milton.evolve.student`, :mod:`~milton.evolve.distil`,
  :mod:`~milton.evolve.prune`, :mod:`~milton.evolve.export`: the stages;
* :mod:`~milton.evolve.measure`, :mod:`~milton.evolve.gate`, :mod:`~milton.evolve.report`:
  measuring, deciding, reporting.

Imports :mod:`milton.core`, :mod:`milton.models`, :mod:`milton.memory` and :mod:`milton.train`.
"""
