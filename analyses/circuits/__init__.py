"""Circuit analyses: activation, attribution and path patching, direct logit attribution.

Every method takes a :class:`~analyses.circuits.pairs.PromptPairs` set (clean/corrupted
prompts of equal length, an answer and a wrong token each), streams it in batches, and returns
a tidy DataFrame; plots and reports live in :mod:`analyses.app.sections.patch`.
"""
