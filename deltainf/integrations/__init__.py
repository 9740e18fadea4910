"""deltainf as a backend of the attribution libraries people already use. Each module imports its peer
lazily (the peers are optional extras):

- :mod:`deltainf.integrations.kronfluence`: kronfluence EK-FAC factor folders read into / written from a
  :class:`deltainf.EKFAC`; a kronfluence ``Task`` as deltainf's measurement.
- :mod:`deltainf.integrations.trak`: :class:`~deltainf.integrations.trak.TRAKProjector`, a traker projector on
  deltainf's JL kernel (``TRAKer(..., projector=TRAKProjector(...))``), at traker's scale by default.
- :mod:`deltainf.integrations.dattri`: ``EKFACAttributor`` and ``DeltaInfluenceAttributor`` on dattri's
  ``BaseAttributor`` contract (``cache``, ``attribute``).
- :mod:`deltainf.integrations.art`: ``DeltaInfluenceDefence``, an ART ``PoisonFilteringDefence``
  (``detect_poison``, ``evaluate_defence``).

Guide with runnable examples: docs/INTEGRATIONS.md.
"""
