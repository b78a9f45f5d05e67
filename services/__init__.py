"""tierlab's serving side: the contracts every part shares and the tier service.

``services.contracts`` is the leaf every other package depends on; ``services.tier`` is one tier's
process (mobile, edge or cloud by configuration); ``python -m services`` starts tiers and demo models.
"""
