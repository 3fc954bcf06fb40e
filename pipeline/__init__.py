"""LoRA+ fine-tuning on DeepSpeed ZeRO.

Subpackages by concern, each importing only those below it (docs/architecture.md): ``config``, ``errors``,
``files``, ``rundir`` at the bottom; ``data``, ``optim``, ``dist`` (the only importer of DeepSpeed and
torch.distributed, with the fault handling); ``model``; ``eval`` (MMLU); ``observe`` (metrics, trackers); ``train``
(the run); ``plan`` (the memory plan); ``cli`` (the commands) on top.
"""

__version__ = "0.1.0"
