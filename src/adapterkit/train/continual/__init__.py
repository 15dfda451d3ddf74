"""Continual learning with adapters on a frozen model: a checked stream of tasks, one learner and training loop,
evaluation on every task seen after each task, the standard metrics and the accuracy-matrix plot, and resumable
state. The methods: ``FineTune`` and ``Joint`` (the lower and upper bounds), ``LAE``, ``MOS`` and ``EAR``.

    from adapterkit.train import continual as cl
    backbone = cl.TextBackbone(AutoModel.from_pretrained(path), tokenizer)
    stream = cl.Stream.class_incremental(train, test, [[0, 1], [2, 3], [4, 5]])
    learner = cl.Learner(backbone, ak.LoRA(r=8), targets=["query", "value"], config=cl.ContinualConfig(epochs=2))
    result = cl.run_stream(cl.LAE(), learner, stream, out="runs/trec-lae")   # resume=True continues it
    result.metrics["ensemble"]                                                # final, forgetting, ...
"""

from adapterkit.train.continual.backbone import Backbone, ImageBackbone, TextBackbone
from adapterkit.train.continual.ear import EAR
from adapterkit.train.continual.finetune import FineTune, Joint
from adapterkit.train.continual.lae import LAE
from adapterkit.train.continual.learner import ClassHead, ContinualConfig, ContinualMethod, Learner
from adapterkit.train.continual.metrics import (
    average_incremental,
    backward_transfer,
    final_average,
    forgetting,
    plot_curves,
    plot_matrix,
    summary,
)
from adapterkit.train.continual.mos import MOS
from adapterkit.train.continual.runner import StreamResult, run_stream
from adapterkit.train.continual.stream import Examples, Stream, StreamError, Task

METHODS = {"finetune": FineTune, "joint": Joint, "lae": LAE, "mos": MOS, "ear": EAR}

__all__ = ["EAR", "LAE", "METHODS", "MOS", "Backbone", "ClassHead", "ContinualConfig", "ContinualMethod", "Examples",
           "FineTune", "ImageBackbone", "Joint", "Learner", "Stream", "StreamError", "StreamResult", "Task",
           "TextBackbone", "average_incremental", "backward_transfer", "final_average", "forgetting", "plot_curves",
           "plot_matrix", "run_stream", "summary"]
