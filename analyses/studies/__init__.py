"""Training studies: small models trained under controlled variations, measured as tidy frames.

- :mod:`.norm`: pre- vs post-norm at several depths, with and without learning-rate warm-up
  (Xiong et al. 2020): divergence rate, final loss, gradient norm per layer at initialisation.
- :mod:`.masking`: one model trained under causal, BERT-style masked-LM, prefix-LM, soft
  temperature and learned masks on the same data: loss, stability, next-token vs cloze accuracy.

Both train on :class:`.data.MarkovCorpus`, a seeded synthetic language whose entropy rate is
known exactly, so "trained" and "failed" are measured against the floor the data allows. Like
every analysis, a study returns DataFrames and writes no files (``interp study`` does the I/O).
"""

from analyses.studies.data import MarkovCorpus
from analyses.studies.loop import TrainRun, train_run
from analyses.studies.masking import STRATEGIES, masking_study
from analyses.studies.norm import norm_study

__all__ = ["STRATEGIES", "MarkovCorpus", "TrainRun", "masking_study", "norm_study", "train_run"]
