"""Everything that touches DeepSpeed or torch.distributed (and the run's fault handling beside it): ``ds_config`` (the
JSON), ``comm`` (process group, collectives), ``engine`` (``deepspeed.initialize`` and its state), ``watchdog`` (peer
liveness), ``preempt`` (SIGTERM/SIGINT), ``faults`` (fault injection for tests). The first three are re-exported
here, so callers write ``from pipeline import distributed as dist; dist.barrier()``."""

from pipeline.distributed.comm import *  # noqa: F403
from pipeline.distributed.ds_config import *  # noqa: F403
from pipeline.distributed.engine import *  # noqa: F403
