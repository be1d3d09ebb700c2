"""Training tasks whose mechanism is known, each a seeded batch generator.

An analysis is only trustworthy once it has found what we know is there. Each task here
documents the mechanism a model trained on it should develop, so the head taxonomy, FFN
knowledge probes and MoE analyses can be checked against ground truth:

========== ====================================================== ==========================
task       data                                                   mechanism it should produce
========== ====================================================== ==========================
induction  ``[BOS] x1..xn x1..xn``, x i.i.d. uniform tokens        previous-token head (layer 0)
                                                                   + induction head (layer 1)
                                                                   (Olsson et al. 2022)
knowledge  ``[BOS] <subject name tokens> <relation> <object>``     facts stored in the weights,
           for a fixed synthetic knowledge base                    locatable by FFN probes
                                                                   (Geva et al. 2021; Meng et
                                                                   al. 2022)
domains    segments of several token domains (own sub-vocabulary   experts may specialise by
           and Markov grammar, plus shared tokens) in one stream   domain (Fedus et al. 2021;
                                                                   Jiang et al. 2024)
text       windows of a user's text file (bytes or GPT-2 BPE)      natural-language heads
========== ====================================================== ==========================

A task is built from plain, JSON-able parameters (:attr:`Task.params`); the same parameters
regenerate the same vocabulary, knowledge base and grammars, so a checkpoint that stores them
can rebuild its data (:func:`interp.train.knowledge_facts`, :func:`interp.train.domain_batches`).
Randomness in *what the task is* (the knowledge base, the grammars) comes from the task's own
``data_seed``; randomness in *which batch comes next* comes from the ``torch.Generator`` the
trainer passes to :meth:`Task.sample`, so training is deterministic given a seed.

The package: :mod:`.base` (Task, Batch), one module per task (:mod:`.induction`,
:mod:`.knowledge`, :mod:`.domains`, :mod:`.text`) and :mod:`.registry` (the tasks by name).
"""

from interp.train.tasks.base import Batch, Task, next_token_labels
from interp.train.tasks.domains import Domains
from interp.train.tasks.induction import Induction
from interp.train.tasks.knowledge import Fact, Knowledge
from interp.train.tasks.registry import TASKS, make_task
from interp.train.tasks.text import Text

__all__ = [
    "TASKS",
    "Batch",
    "Domains",
    "Fact",
    "Induction",
    "Knowledge",
    "Task",
    "Text",
    "make_task",
    "next_token_labels",
]
