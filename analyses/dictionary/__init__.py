"""Dictionary learning on activations: sparse autoencoders and transcoders.

- :mod:`~analyses.dictionary.sae`: :class:`SAE` and :class:`SAEConfig` (relu, topk, jumprelu;
  transcoders via ``hook_name_out``), with their own hook points;
- :mod:`~analyses.dictionary.splice`: :func:`splice` them into any hook of a model, the
  reconstruction error kept as its own hook (exact when nothing is edited);
- :mod:`~analyses.dictionary.train`: :func:`collect_activations`, :func:`train_sae` (on a
  matrix in memory, or streamed from an on-disk activation store);
- :mod:`~analyses.dictionary.stream`: :class:`StoreSplit`, the held-out-by-document view of an
  ``interp activations`` store that training and the metrics stream over;
- :mod:`~analyses.dictionary.metrics`: L0, explained variance, dead/dense features, CE loss
  recovered, feature recovery against ground truth, top-activating examples;
- :mod:`~analyses.dictionary.toy`: the toy model of superposition (Elhage et al. 2022);
- :mod:`~analyses.dictionary.saelens_format`: SAELens' ``cfg.json`` +
  ``sae_weights.safetensors`` folders, saved and loaded;
- :mod:`~analyses.dictionary.study`: the two studies the ``interp sae`` report shows.
"""

from analyses.dictionary.sae import SAE, SAEConfig
from analyses.dictionary.saelens_format import load_saelens, save_saelens
from analyses.dictionary.splice import splice
from analyses.dictionary.stream import StoreSplit
from analyses.dictionary.train import collect_activations, train_sae

__all__ = ["SAE", "SAEConfig", "StoreSplit", "collect_activations", "load_saelens",
           "save_saelens", "splice", "train_sae"]
